//! FHIR R4 facts the engine needs: the resource types and HealthLake's id
//! pattern, from the generated model of `fhirflow-fhir`.

pub use fhirflow_fhir::{is_valid_id, resource_type, RESOURCE_TYPES};
