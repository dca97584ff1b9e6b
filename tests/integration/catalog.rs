//! The whole pipeline on `s3://` (moto): ingest → curate → import into the
//! HealthLake stand-in → Glue catalog sync; the catalog read back through the
//! Glue API, twice to show the sync is idempotent.

use aws_sdk_glue::Client;
use fhirflow::run::{run, RunPlan};
use fhirflow::settings::ImportTarget;
use fhirflow_tests::healthlake::HealthLake;
use fhirflow_tests::*;
use object_store::ObjectStoreExt;

const ROLE: &str = "arn:aws:iam::123456789012:role/healthlake-import";
const DATASTORE: &str = "ds0f8fad5bd9cb469fa16570867728950e";

#[tokio::test(flavor = "multi_thread")]
async fn run_on_s3_imports_and_describes_every_layer_in_glue() {
    let moto = Moto::start();
    moto.create_bucket("lake");
    moto.create_bucket("hl-output");
    let hl = HealthLake::start(&moto.endpoint(), &[(DATASTORE, ROLE)]);
    let t = TestLake::with(|s| {
        moto.configure(s, "lake", "fhir");
        hl.configure(s, TENANT, DATASTORE, ROLE);
        s.glue.endpoint = Some(moto.endpoint());
        s.glue.env = "test".into();
    });
    let plan = RunPlan {
        paths: vec![shared().join("data/synthea-10")],
        extract: None,
        tenant: tenant(),
        source_system: Some("synthea".parse().unwrap()),
        date: date(),
        import: Some(ImportTarget::Healthlake),
        wait: true,
    };
    let report = run(&t.lake, &t.settings, &plan, &fhirflow::report::Quiet)
        .await
        .expect("run");
    assert_eq!(report.curate.total.curated, 7160);
    let imported = report.import.expect("import ran");
    assert_eq!((imported.records_in, imported.records_out), (7160, 7160));
    assert_eq!(hl.stored(DATASTORE).len(), 7160);
    let sync = report.catalog.expect("an S3 lake is synced");
    // Metadata: three current tables and three `_history` tables.
    assert_eq!(sync.tables_created, 13 + 13 + 3 + 3);
    assert!(sync.partitions_added > 0);

    // Read the catalog back through the Glue API.
    let config = fhirflow_aws::sdk::sdk_config(&t.settings, Some(&moto.endpoint()), None, 3).await;
    let glue = Client::new(&config);
    let dbs: Vec<String> = glue
        .get_databases()
        .send()
        .await
        .unwrap()
        .database_list()
        .iter()
        .map(|d| d.name().to_string())
        .collect();
    for db in [
        "external_fhir_raw",
        "external_fhir_curated",
        "fhir_import_metadata_test",
    ] {
        assert!(dbs.contains(&db.to_string()), "{db} in {dbs:?}");
    }
    let table = glue
        .get_table()
        .database_name("external_fhir_curated")
        .name("patient")
        .send()
        .await
        .unwrap();
    let table = table.table().unwrap();
    let keys: Vec<&str> = table.partition_keys().iter().map(|c| c.name()).collect();
    assert_eq!(keys, vec!["tenant_guid", "import_date"]);
    let sd = table.storage_descriptor().unwrap();
    let columns: Vec<&str> = sd.columns().iter().map(|c| c.name()).collect();
    assert!(
        columns.contains(&"id") && columns.contains(&"birthdate"),
        "{columns:?}"
    );
    assert_eq!(
        sd.serde_info().unwrap().serialization_library(),
        Some("org.openx.data.jsonserde.JsonSerDe")
    );

    let parts = glue
        .get_partitions()
        .database_name("external_fhir_curated")
        .table_name("patient")
        .send()
        .await
        .unwrap();
    let parts = parts.partitions();
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].values(), [TENANT.to_string(), DATE.to_string()]);
    // The partition's symlink lists exactly the partition's Patient files.
    let location = parts[0].storage_descriptor().unwrap().location().unwrap();
    let key = location.strip_prefix("s3://lake/").unwrap();
    let symlink = object_store::path::Path::from(format!("{}symlink.txt", key));
    let text = t
        .lake
        .metadata
        .store
        .get(&symlink)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let listed: Vec<&str> = std::str::from_utf8(&text).unwrap().lines().collect();
    assert_eq!(
        listed,
        vec![format!("s3://lake/fhir/curated/tenantGuid={TENANT}/import_date={DATE}/Patient-processed.ndjson")]
    );

    let raw_parts = glue
        .get_partitions()
        .database_name("external_fhir_raw")
        .table_name("encounter")
        .send()
        .await
        .unwrap();
    assert_eq!(
        raw_parts.partitions()[0].values(),
        [TENANT.to_string(), "synthea".into(), DATE.to_string()]
    );
    let jobs = glue
        .get_table()
        .database_name("fhir_import_metadata_test")
        .name("import_jobs")
        .send()
        .await
        .unwrap();
    let jobs = jobs.table().unwrap();
    let cols: Vec<&str> = jobs
        .storage_descriptor()
        .unwrap()
        .columns()
        .iter()
        .map(|c| c.name())
        .collect();
    assert!(
        cols.contains(&"healthlake_job_id") && !cols.contains(&"tenant_guid"),
        "{cols:?}"
    );

    // Again: nothing new to register, tables updated in place.
    let again = fhirflow_aws::glue::sync(&t.lake, &t.settings)
        .await
        .expect("sync again");
    assert_eq!((again.tables_created, again.partitions_added), (0, 0));
    assert_eq!(again.tables_updated, 32);

    // The same names answer locally.
    let rows = t
        .sql("SELECT count(*) FROM external_fhir_curated.patient WHERE tenant_guid = '0f8fad5b-d9cb-469f-a165-70867728950e'")
        .await;
    assert_eq!(rows, vec![vec!["13".to_string()]]);
    let rows = t
        .sql("SELECT healthlake_status FROM fhir_import_metadata_test.import_jobs WHERE stage = 'import'")
        .await;
    assert_eq!(rows, vec![vec!["COMPLETED".to_string()]]);

    // A damaged sync state is an error naming it, not a fresh start.
    let state = object_store::path::Path::from("fhir/metadata/_catalog/test.json");
    t.lake
        .metadata
        .store
        .put(&state, "{\"registered\": ".into())
        .await
        .unwrap();
    let err = fhirflow_aws::glue::sync(&t.lake, &t.settings)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("_catalog/test.json") && err.contains("not a catalog sync state"),
        "{err}"
    );
}
