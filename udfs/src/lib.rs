//! fhirflow's DataFusion UDFs and the text-preserving FHIR JSON functions
//! behind them.
//!
//! * [`json`]: a validating JSON scanner that reports byte spans.
//! * [`tenant_label`]: curation step 5, the tenant label in `meta.security`.
//! * `fhir_validate`: curation step 2's FHIR R4 validator in SQL.
//!
//! [`register_all`] adds every SQL function to a DataFusion session,
//! including JSON access from datafusion-functions-json.

pub mod json;
mod strings;
pub mod tenant_label;
mod udf_tenant_label;
mod udf_validate;

use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::SessionContext;

pub use udf_tenant_label::TenantLabel;
pub use udf_validate::FhirValidate;

/// Every SQL function of this crate.
pub fn all_udfs() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::new_from_impl(TenantLabel::label()),
        ScalarUDF::new_from_impl(TenantLabel::error()),
        ScalarUDF::new_from_impl(FhirValidate::default()),
    ]
}

/// Registers every SQL function of this crate in `ctx`, and the JSON access
/// functions of datafusion-functions-json (`json_get_str`, `json_contains`,
/// `json_length`, the `->` and `->>` operators, …).
pub fn register_all(ctx: &mut SessionContext) -> datafusion::common::Result<()> {
    for udf in all_udfs() {
        ctx.register_udf(udf);
    }
    datafusion_functions_json::register_all(ctx)
}
