//! Every layer on `s3://`, against moto: the same run gives the same curated
//! bytes as on a local lake, and SQL reads every layer there.

use futures::TryStreamExt;

use fhirflow_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_on_s3_gives_the_same_bytes_as_on_local_disk() {
    let moto = Moto::start();
    moto.create_bucket("fhirflow-lake");
    let s3 = TestLake::with(|s| moto.configure(s, "fhirflow-lake", "tenants/lake"));
    let local = TestLake::new();
    let sample = shared().join("data/synthea-10");
    for t in [&s3, &local] {
        t.ingest(std::slice::from_ref(&sample), "synthea").await;
        let report = t.curate().await.expect("curate");
        assert_eq!(report.total.curated, 7160);
    }

    // The curated objects on S3, byte for byte the local files.
    let root = &s3.lake.curated;
    let expected = local.curated_files();
    assert_eq!(s3.visible_files().await, expected);

    // SQL over every layer on S3.
    let rows = s3
        .sql("SELECT (SELECT count(*) FROM raw.patient) AS r, (SELECT count(*) FROM curated.patient) AS c, (SELECT sum(records_in) FROM metadata.import_metrics WHERE rule IS NULL) AS m")
        .await;
    assert_eq!(
        rows,
        vec![vec!["13".to_string(), "13".into(), "7160".into()]]
    );
    // The run's own parts are all that is left besides the visible folder.
    let runs = root.paths.curated_runs(&tenant(), date());
    let left: Vec<_> = root.store.list(Some(&runs)).try_collect().await.unwrap();
    assert_eq!(left.len(), expected.len(), "{left:?}");
}
