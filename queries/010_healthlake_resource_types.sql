-- Rejects records of resource types that AWS HealthLake does not store, so
-- that they are reported here, per record and with a reason, instead of
-- failing inside the HealthLake import job.
--
-- The list is every FHIR R4 resource type missing from the table "FHIR R4
-- supported resource types for HealthLake"
-- (https://docs.aws.amazon.com/healthlake/latest/devguide/reference-fhir-resource-types.html,
-- as read in November 2026). Edit it when HealthLake adds a type. Setting
-- rule_param healthlake_types=keep turns the rule off (for a lake that never
-- goes to HealthLake).
SELECT *,
       CASE
           WHEN rule_param('healthlake_types', 'reject') = 'reject'
            AND resource_type IN (
               'Basic', 'BiologicallyDerivedProduct', 'CatalogEntry', 'ClinicalImpression',
               'CompartmentDefinition', 'EventDefinition', 'Evidence', 'EvidenceVariable',
               'ExampleScenario', 'GraphDefinition', 'MedicinalProduct',
               'MedicinalProductAuthorization', 'MedicinalProductContraindication',
               'MedicinalProductIndication', 'MedicinalProductIngredient',
               'MedicinalProductInteraction', 'MedicinalProductManufactured',
               'MedicinalProductPackaged', 'MedicinalProductPharmaceutical',
               'MedicinalProductUndesirableEffect', 'MessageDefinition', 'NamingSystem',
               'ObservationDefinition', 'OperationDefinition', 'ResearchDefinition',
               'ResearchElementDefinition', 'SearchParameter', 'SpecimenDefinition',
               'Subscription', 'SubstanceNucleicAcid', 'SubstancePolymer', 'SubstanceProtein',
               'SubstanceReferenceInformation', 'SubstanceSourceMaterial',
               'SubstanceSpecification', 'TerminologyCapabilities', 'TestReport', 'TestScript')
           THEN 'AWS HealthLake does not store ' || resource_type || ' resources'
       END AS reject_reason
FROM records
