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

/// The multipart uploads moto holds open in `bucket`.
async fn open_uploads(moto: &Moto, bucket: &str) -> usize {
    let listing = reqwest::get(format!("{}/{bucket}?uploads", moto.endpoint()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listing.contains("ListMultipartUploadsResult"), "{listing}");
    listing.matches("<UploadId>").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_curate_that_fails_mid_upload_leaves_no_multipart_upload_behind() {
    let moto = Moto::start();
    moto.create_bucket("lake");
    let t = TestLake::with(|s| moto.configure(s, "lake", "fhir"));
    // One raw file whose curated part passes the 8 MiB upload buffer, so it
    // is a multipart upload when the write fails.
    let dir = t.input("big");
    let mut text = String::new();
    for i in 0..110_000 {
        text.push_str(&format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"p{i}\",\"name\":[{{\"family\":\"Family{i}\",\"given\":[\"Given\"]}}]}}\n"
        ));
    }
    std::fs::write(dir.join("Patient.ndjson"), text).unwrap();
    t.ingest(&[dir], "src").await;
    assert_eq!(open_uploads(&moto, "lake").await, 0);

    let out = t.cli(
        &["curate", "--tenant", TENANT, "--date", DATE],
        &[("FHIRFLOW_FAILPOINT", "pass-2-write-fails")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("pass-2-write-fails"), "{stderr}");
    assert_eq!(open_uploads(&moto, "lake").await, 0, "no upload left open");

    // The partition is as it was, and the next run curates it.
    assert!(t.visible_files().await.is_empty());
    let report = t.curate().await.expect("curate");
    assert_eq!(report.total.curated, 110_000);
}
