//! fhirflow's DataFusion UDFs and the text-preserving FHIR JSON functions
//! behind them.
//!
//! * [`json`]: a validating JSON scanner that reports byte spans.
//! * [`tenant_label`]: curation step 5, the tenant label in `meta.security`.
//!
//! [`register_all`] adds every SQL function to a DataFusion session.

pub mod json;
mod strings;
pub mod tenant_label;
mod udf_tenant_label;

use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::SessionContext;

pub use udf_tenant_label::TenantLabel;

/// Every SQL function of this crate.
pub fn all_udfs() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::new_from_impl(TenantLabel::label()),
        ScalarUDF::new_from_impl(TenantLabel::error()),
    ]
}

/// Registers every SQL function of this crate in `ctx`.
pub fn register_all(ctx: &SessionContext) {
    for udf in all_udfs() {
        ctx.register_udf(udf);
    }
}
