//! SQL: `fhir_tenant_label(resource, tenant [, system])` and
//! `fhir_tenant_label_error(resource, tenant [, system])`.
//!
//! The first returns the resource with exactly one tenant label (see
//! [`crate::tenant_label`]), or NULL where it cannot be labelled; the second
//! returns why not (NULL when it can), so a rule can turn it into a
//! `reject_reason`.
//!
//! ```sql
//! SELECT fhir_tenant_label(resource, tenant_guid) FROM curated.patient;
//! ```

use std::any::Any;

use arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ScalarFunctionArgs, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};

use crate::strings::map_strings;
use crate::tenant_label::{TenantLabeller, DEFAULT_TENANT_SYSTEM};

/// Nesting limit used when the UDF scans a resource in SQL.
const SQL_MAX_DEPTH: usize = 256;

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TenantLabel {
    signature: Signature,
    report_error: bool,
    doc: Documentation,
}

impl TenantLabel {
    /// `fhir_tenant_label`.
    pub fn label() -> Self {
        Self::new(false)
    }
    /// `fhir_tenant_label_error`.
    pub fn error() -> Self {
        Self::new(true)
    }
    fn new(report_error: bool) -> Self {
        Self {
            signature: Signature::one_of(
                vec![TypeSignature::String(2), TypeSignature::String(3)],
                Volatility::Immutable,
            ),
            report_error,
            doc: if report_error {
                Documentation::builder(
                    crate::udf_fhir::SECTION,
                    "Why `fhir_tenant_label` cannot label the resource (another tenant's label, a malformed `meta`, text that is not JSON), or NULL when it can. A rule turns it into a `reject_reason`.",
                    "fhir_tenant_label_error(resource, tenant [, system])",
                )
                .with_sql_example("```sql\nSELECT *, fhir_tenant_label_error(resource, tenant_guid) AS reject_reason FROM records;\n```")
            } else {
                Documentation::builder(
                    crate::udf_fhir::SECTION,
                    "The resource with exactly one tenant label in `meta.security` (`system` defaults to `http://thirdopinion.io/identity/claims/tenant`), added with a text-preserving edit; other labels stay. NULL when it cannot be labelled (see `fhir_tenant_label_error`). Curation step 5 applies the same edit.",
                    "fhir_tenant_label(resource, tenant [, system])",
                )
                .with_sql_example("```sql\nSELECT fhir_tenant_label(resource, tenant_guid) FROM records;\n```")
            }
            .with_argument("resource", "A FHIR resource as text.")
            .with_argument("tenant", "The tenant GUID: the label's code.")
            .with_argument("system", "The label's system (optional).")
            .build(),
        }
    }
}

impl ScalarUDFImpl for TenantLabel {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        if self.report_error {
            "fhir_tenant_label_error"
        } else {
            "fhir_tenant_label"
        }
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn documentation(&self) -> Option<&Documentation> {
        Some(&self.doc)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let report_error = self.report_error;
        // The tenant and system are almost always the same on every row:
        // build the labeller (its texts) once, again only when they change.
        let mut labeller: Option<TenantLabeller> = None;
        map_strings(self.name(), args, |row| {
            let (resource, tenant) = (row[0]?, row[1]?);
            let system = row.get(2).copied().unwrap_or(Some(DEFAULT_TENANT_SYSTEM))?;
            let l = match labeller.take() {
                Some(l) if l.is_for(system, tenant) => l,
                _ => TenantLabeller::new(system, tenant),
            };
            let result = l.apply(resource, SQL_MAX_DEPTH);
            labeller = Some(l);
            match (result, report_error) {
                (Ok(labelled), false) => Some(labelled),
                (Err(e), true) => Some(e.to_string().into()),
                _ => None,
            }
        })
    }
}
