//! SQL: `fhir_validate(resource [, level])`, the FHIR R4 validator of curate
//! step 2 ([`fhirflow_fhir::Validator`]) as a function: the findings of a
//! resource as a list of `{severity, code, location, message}` structs, empty
//! when it is valid, NULL for a NULL resource. `level` is `strict` (the
//! default) or `structure-only` (no value-set bindings).
//!
//! ```sql
//! SELECT id, f['code'] AS code, f['location'] AS location
//! FROM (SELECT id, unnest(fhir_validate(resource)) AS f FROM raw.observation);
//!
//! SELECT count(*) FROM raw.patient WHERE cardinality(fhir_validate(resource)) = 0;
//! ```

use std::any::Any;
use std::sync::Arc;

use arrow::array::{ArrayRef, ListBuilder, StringBuilder, StructBuilder};
use arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::{exec_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ScalarFunctionArgs, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};
use fhirflow_fhir::{Level, Validator};

use crate::strings::for_each_row;

/// Nesting limit used when the UDF validates in SQL.
const SQL_MAX_DEPTH: usize = 256;
const FIELDS: [&str; 4] = ["severity", "code", "location", "message"];

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct FhirValidate {
    signature: Signature,
    doc: Documentation,
}

impl Default for FhirValidate {
    fn default() -> Self {
        Self {
            signature: Signature::one_of(
                vec![TypeSignature::String(1), TypeSignature::String(2)],
                Volatility::Immutable,
            ),
            doc: Documentation::builder(
                crate::udf_fhir::SECTION,
                "The FHIR R4 validation findings of a resource (curation step 2's validator) as a list of `{severity, code, location, message}` structs: empty when it is valid, NULL for NULL.",
                "fhir_validate(resource [, level])",
            )
            .with_argument("resource", "A FHIR resource as text.")
            .with_argument("level", "`strict` (the default) or `structure-only` (value-set bindings not checked).")
            .with_sql_example("```sql\nSELECT id, f['code'] AS code, f['location'] AS location\nFROM (SELECT id, unnest(fhir_validate(resource)) AS f FROM records);\n```")
            .build(),
        }
    }
}

fn finding_fields() -> Fields {
    FIELDS
        .iter()
        .map(|n| Field::new(*n, DataType::Utf8, false))
        .collect()
}

fn item_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Struct(finding_fields()), true))
}

impl ScalarUDFImpl for FhirValidate {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        "fhir_validate"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::List(item_field()))
    }
    fn documentation(&self) -> Option<&Documentation> {
        Some(&self.doc)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let builders: Vec<Box<dyn arrow::array::ArrayBuilder>> = FIELDS
            .iter()
            .map(|_| Box::new(StringBuilder::new()) as _)
            .collect();
        let mut out = ListBuilder::new(StructBuilder::new(finding_fields(), builders))
            .with_field(item_field());
        let mut validator: Option<Validator> = None;
        let mut bad_level: Option<String> = None;
        for_each_row(self.name(), &args, |row| {
            let Some(resource) = row[0] else {
                out.append_null();
                return;
            };
            let level = match row.get(1).copied().flatten().map(str::parse::<Level>) {
                None => Level::Strict,
                Some(Ok(Level::Off)) | Some(Err(_)) => {
                    bad_level.get_or_insert_with(|| row[1].unwrap_or_default().to_string());
                    out.append_null();
                    return;
                }
                Some(Ok(level)) => level,
            };
            let v = match validator.take() {
                Some(v) if v.level() == level => v,
                _ => Validator::new(level, SQL_MAX_DEPTH),
            };
            let findings = v.validate(resource, None);
            validator = Some(v);
            let s = out.values();
            for f in &findings {
                let values = [
                    f.severity.as_str(),
                    f.code,
                    f.location.as_str(),
                    f.message.as_str(),
                ];
                for (i, value) in values.iter().enumerate() {
                    s.field_builder::<StringBuilder>(i)
                        .expect("string field")
                        .append_value(value);
                }
                s.append(true);
            }
            out.append(true);
        })?;
        if let Some(level) = bad_level {
            return exec_err!("fhir_validate: level '{level}' is not strict or structure-only");
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish()) as ArrayRef))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    async fn query(sql: &str) -> Vec<String> {
        let mut ctx = SessionContext::new();
        crate::register_all(&mut ctx).unwrap();
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        text.lines().map(str::to_string).collect()
    }

    #[tokio::test]
    async fn findings_as_rows() {
        let lines = query(
            r#"SELECT f['code'] AS code, f['location'] AS location FROM (SELECT unnest(fhir_validate('{"resourceType":"Observation","id":"o","status":"done","code":{"text":"x"},"valueString":""}')) AS f)"#,
        )
        .await;
        let text = lines.join("\n");
        assert!(
            text.contains("CODE_NOT_IN_VALUE_SET") && text.contains("Observation.status"),
            "{text}"
        );
        assert!(
            text.contains("EMPTY_STRING") && text.contains("Observation.valueString"),
            "{text}"
        );
        // structure-only leaves bindings out; a valid resource has no findings; NULL stays NULL.
        let lines = query(
            r#"SELECT cardinality(fhir_validate('{"resourceType":"Observation","id":"o","status":"done","code":{"text":"x"}}', 'structure-only')) AS n,
                      cardinality(fhir_validate('{"resourceType":"Patient","id":"p"}')) AS m,
                      fhir_validate(NULL) IS NULL AS z"#,
        )
        .await;
        assert!(lines.join("\n").contains("| 0 | 0 | true |"), "{lines:?}");
    }
}
