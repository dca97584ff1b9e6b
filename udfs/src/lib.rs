//! fhirflow's DataFusion UDFs and the text-preserving FHIR JSON functions
//! behind them.
//!
//! * [`json`]: a validating JSON scanner that reports byte spans.
//! * [`path`]: simple FHIRPath-like paths and text-preserving edits.
//! * [`tenant_label`]: curation step 5, the tenant label in `meta.security`.
//! * the SQL functions: FHIR helpers (`fhir_get`, `fhir_set`, …), the tenant
//!   label, `fhir_validate` and `rule_param`; `REFERENCE.md` in this crate is
//!   generated from their documentation by [`reference_markdown`].
//!
//! [`register_all`] adds every SQL function to a DataFusion session,
//! including JSON access from datafusion-functions-json.

pub mod json;
pub mod path;
mod strings;
pub mod tenant_label;
mod udf_fhir;
mod udf_tenant_label;
mod udf_validate;

use std::collections::BTreeMap;

use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::SessionContext;

pub use strings::replace_views;
pub use udf_fhir::{parse_instant, FhirFunction, RuleParam};
pub use udf_tenant_label::TenantLabel;
pub use udf_validate::FhirValidate;

/// Every SQL function of this crate (`rule_param` without settings).
pub fn all_udfs() -> Vec<ScalarUDF> {
    let mut all = udf_fhir::functions();
    all.extend([
        ScalarUDF::new_from_impl(TenantLabel::label()),
        ScalarUDF::new_from_impl(TenantLabel::error()),
        ScalarUDF::new_from_impl(FhirValidate::default()),
        ScalarUDF::new_from_impl(RuleParam::new(BTreeMap::new())),
    ]);
    all
}

/// Registers every SQL function of this crate in `ctx`, and the JSON access
/// functions of datafusion-functions-json (`json_get_str`, `json_contains`,
/// `json_length`, the `->` and `->>` operators, …).
pub fn register_all(ctx: &mut SessionContext) -> datafusion::common::Result<()> {
    register_with_params(ctx, BTreeMap::new())
}

/// [`register_all`], with the values `rule_param` returns.
pub fn register_with_params(
    ctx: &mut SessionContext,
    params: BTreeMap<String, String>,
) -> datafusion::common::Result<()> {
    for udf in all_udfs() {
        ctx.register_udf(udf);
    }
    ctx.register_udf(ScalarUDF::new_from_impl(RuleParam::new(params)));
    datafusion_functions_json::register_all(ctx)
}

/// The SQL function reference (`udfs/REFERENCE.md`), generated from each
/// function's documentation.
pub fn reference_markdown() -> String {
    let mut udfs = all_udfs();
    udfs.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = String::from(
        "# SQL function reference\n\n\
         Generated from the functions' own documentation by \
         `fhirflow_udfs::reference_markdown` (the test `reference_is_current` \
         checks this file; regenerate with \
         `FHIRFLOW_BLESS=1 cargo test -p fhirflow-udfs --test reference`).\n\n\
         Every function is available in `fhirflow sql`, in rules and in rule \
         tests. JSON access comes from \
         [datafusion-functions-json](https://github.com/datafusion-contrib/datafusion-functions-json): \
         `json_get`, `json_get_str`, `json_get_int`, `json_get_float`, \
         `json_get_bool`, `json_get_json`, `json_get_array`, `json_as_text`, \
         `json_contains`, `json_length`, `json_object_keys` and the `->`, `->>` \
         and `?` operators.\n\n",
    );
    for u in &udfs {
        out.push_str(&format!("- [`{0}`](#{0})\n", u.name()));
    }
    for u in &udfs {
        let Some(d) = u.documentation() else { continue };
        out.push_str(&format!(
            "\n## {}\n\n{}\n\n```sql\n{}\n```\n",
            u.name(),
            d.description,
            d.syntax_example
        ));
        if let Some(args) = &d.arguments {
            out.push_str("\n**Arguments**\n\n");
            for (name, text) in args {
                out.push_str(&format!("- `{name}`: {text}\n"));
            }
        }
        if let Some(example) = &d.sql_example {
            out.push_str(&format!("\n**Example**\n\n{example}\n"));
        }
    }
    out
}
