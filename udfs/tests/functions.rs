//! Every SQL function of the library, called through DataFusion as rules and
//! `fhirflow sql` call them.

use datafusion::prelude::SessionContext;

async fn one(sql: &str) -> String {
    let mut ctx = SessionContext::new();
    fhirflow_udfs::register_all(&mut ctx).unwrap();
    let batches = ctx
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let opts = arrow::util::display::FormatOptions::default().with_null("NULL");
    let f = arrow::util::display::ArrayFormatter::try_new(batches[0].column(0).as_ref(), &opts)
        .unwrap();
    f.value(0).to_string()
}

const OBS: &str = r##"{"resourceType":"Observation","id":"o1","status":"preliminary","code":{"coding":[{"system":"a","code":"1"},{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/p1"},"performer":[{"reference":"https://h/fhir/Practitioner/d1/_history/2"},{"reference":"#c1"}],"identifier":[{"value":" 42 "}],"valueQuantity":{"value":1.50,"unit":"/min"},"effectiveDateTime":"2024-03-01T10:00:00+02:00"}"##;

fn q(expr: &str) -> String {
    format!(
        "SELECT {} AS v FROM (SELECT '{}' AS r)",
        expr,
        OBS.replace('\'', "''")
    )
}

#[tokio::test]
async fn reading() {
    assert_eq!(one(&q("fhir_get(r, 'valueQuantity.value')")).await, "1.50");
    assert_eq!(
        one(&q("fhir_get(r, 'Observation.code.coding[1].system')")).await,
        "http://loinc.org"
    );
    assert_eq!(one(&q("fhir_get(r, 'Patient.id')")).await, "NULL");
    assert_eq!(
        one(&q("fhir_get(r, 'subject')")).await,
        r#"{"reference":"Patient/p1"}"#
    );
    assert_eq!(
        one(&q("fhir_get_all(r, 'descendants().reference')")).await,
        "[Patient/p1, https://h/fhir/Practitioner/d1/_history/2, #c1]"
    );
    assert_eq!(
        one(&q("cardinality(fhir_get_all(r, 'nothing'))")).await,
        "0"
    );
    assert_eq!(
        one(&q("fhir_code(r, 'code', 'http://loinc.org')")).await,
        "8867-4"
    );
    assert_eq!(one(&q("fhir_code(r, 'code', 'zz')")).await, "NULL");
    // JSON access from datafusion-functions-json is registered too.
    assert_eq!(
        one(&q("json_get_str(r, 'subject', 'reference')")).await,
        "Patient/p1"
    );
}

#[tokio::test]
async fn references() {
    assert_eq!(one("SELECT fhir_ref_type('Patient/123')").await, "Patient");
    assert_eq!(
        one("SELECT fhir_ref_id('https://h/fhir/Patient/123/_history/2')").await,
        "123"
    );
    assert_eq!(
        one(r#"SELECT fhir_ref_id('{"reference":"Encounter/e-1"}')"#).await,
        "e-1"
    );
    assert_eq!(one("SELECT fhir_ref_type('#contained')").await, "NULL");
    assert_eq!(
        one("SELECT fhir_ref_type('urn:uuid:5e0e1c7b-1a11-4c44-9e43-8e0e1c7b1a11')").await,
        "NULL"
    );
    assert_eq!(one("SELECT fhir_ref_type('Nope/1')").await, "NULL");
}

#[tokio::test]
async fn edits_keep_every_other_byte() {
    let set = one(&q(r#"fhir_set(r, 'status', '"final"')"#)).await;
    assert_eq!(set, OBS.replace("preliminary", "final"));
    let added = one(&q(r#"fhir_set(r, 'valueQuantity.code', '"/min"')"#)).await;
    assert_eq!(
        added,
        OBS.replace(r#""unit":"/min"}"#, r#""unit":"/min","code":"/min"}"#)
    );
    let removed = one(&q("fhir_remove(r, 'performer[1]')")).await;
    assert_eq!(removed, OBS.replace(r##",{"reference":"#c1"}"##, ""));
    let trimmed = one(&q("fhir_trim(r, 'identifier.value', 'code.coding.code')")).await;
    assert_eq!(trimmed, OBS.replace("\" 42 \"", "\"42\""));
    // Unchanged rows come back as they were; a bad value is an error.
    assert_eq!(one(&q("fhir_trim(r, 'id') = r")).await, "true");
    let mut ctx = SessionContext::new();
    fhirflow_udfs::register_all(&mut ctx).unwrap();
    let err = ctx
        .sql(&q("fhir_set(r, 'status', 'not json')"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not JSON"), "{err}");
    let err = ctx
        .sql(&q("fhir_get(r, 'a..b')"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("a..b"), "{err}");
}

/// Rules read the text as string views: the edit functions return views,
/// with changed rows new, unchanged rows as they were and rows with a NULL
/// argument NULL.
#[tokio::test]
async fn edits_over_string_views() {
    use std::sync::Arc;

    use arrow::array::{Array, AsArray, RecordBatch, StringViewArray};
    use arrow::datatypes::{DataType, Field, Schema};

    let other = r#"{"resourceType":"Patient","id":"a-patient-with-no-performer"}"#;
    let texts = StringViewArray::from(vec![Some(OBS), Some(other), None, Some(OBS)]);
    let paths = StringViewArray::from(vec![
        Some("performer[1]"),
        Some("performer[1]"),
        Some("performer[1]"),
        None,
    ]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("r", DataType::Utf8View, true),
        Field::new("p", DataType::Utf8View, true),
    ]));
    let batch = RecordBatch::try_new(schema, vec![Arc::new(texts), Arc::new(paths)]).unwrap();
    let mut ctx = SessionContext::new();
    fhirflow_udfs::register_all(&mut ctx).unwrap();
    ctx.register_batch("t", batch).unwrap();
    for (sql, first) in [
        (
            "SELECT fhir_remove(r, p) FROM t",
            OBS.replace(r##",{"reference":"#c1"}"##, ""),
        ),
        ("SELECT fhir_remove(r, 'nothing') FROM t", OBS.to_string()),
    ] {
        let out = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let col = out[0].column(0);
        assert_eq!(col.data_type(), &DataType::Utf8View, "{sql}");
        let col = col.as_string_view();
        assert_eq!(col.value(0), first, "{sql}");
        assert_eq!(col.value(1), other, "{sql}");
        assert!(col.is_null(2), "{sql}");
        assert_eq!(col.is_null(3), sql.contains("(r, p)"), "{sql}");
    }
}

#[tokio::test]
async fn dates_and_hashes() {
    assert_eq!(
        one("SELECT fhir_instant('2024-03-01T10:00:00+02:00')").await,
        "2024-03-01T08:00:00Z"
    );
    assert_eq!(
        one("SELECT fhir_instant('2024-03')").await,
        "2024-03-01T00:00:00Z"
    );
    assert_eq!(
        one("SELECT fhir_instant('2024-03-01T10:00:00')").await,
        "NULL"
    );
    assert_eq!(one("SELECT fhir_date('1974-12')").await, "1974-12-01");
    assert_eq!(
        one("SELECT fhir_date('2024-03-01T23:30:00-05:00')").await,
        "2024-03-01"
    );
    assert_eq!(one("SELECT fhir_date('2024-13-01')").await, "NULL");
    let a =
        one(r#"SELECT fhir_hash('{"resourceType":"Patient","id":"p","meta":{"versionId":"1"}}')"#)
            .await;
    let b = one(
        r#"SELECT fhir_hash('{ "id":"p", "resourceType":"Patient", "meta":{"versionId":"2"} }')"#,
    )
    .await;
    assert_eq!(a, b);
    assert_eq!(a.len(), 64);
    assert_eq!(one("SELECT fhir_hash('not json')").await, "NULL");
}

#[tokio::test]
async fn labels_validation_and_params() {
    let labelled =
        one(r#"SELECT fhir_tenant_label('{"resourceType":"Patient","id":"p"}', 't1')"#).await;
    assert!(labelled.contains(r#""code":"t1""#), "{labelled}");
    assert_eq!(
        one(r#"SELECT fhir_tenant_label_error('{"resourceType":"Patient","id":"p"}', 't1')"#).await,
        "NULL"
    );
    assert_eq!(
        one(r#"SELECT cardinality(fhir_validate('{"resourceType":"Patient","id":"p"}'))"#).await,
        "0"
    );
    assert_eq!(one("SELECT rule_param('x', 'fallback')").await, "fallback");
    let mut ctx = SessionContext::new();
    fhirflow_udfs::register_with_params(&mut ctx, [("x".to_string(), "set".to_string())].into())
        .unwrap();
    let b = ctx
        .sql("SELECT rule_param('x', 'fallback')")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        b[0].column(0)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap()
            .value(0),
        "set"
    );
}
