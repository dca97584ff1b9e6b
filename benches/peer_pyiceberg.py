"""The import benchmark's peer: the same local import in PyIceberg.

It appends one tenant's curated partition to Iceberg tables in a SQL catalog
on SQLite, one table per resource type, identity-partitioned by tenant, with
the columns and the Parquet codec (snappy) of fhirflow's local lake, one
append (snapshot) per table. It leans on C++ where it can: pyarrow reads each
file as lines, DuckDB pulls the key columns out of the JSON text, PyIceberg
writes through pyarrow. It keeps no metadata rows and does not check for an
earlier import of the same data.

usage: peer_pyiceberg.py CURATED_PARTITION_DIR WAREHOUSE_DIR TENANT DATE EXPECTED_ROWS
"""
import datetime
import os
import sys
import uuid
from collections import defaultdict

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import (
    DateType,
    NestedField,
    StringType,
    TimestamptzType,
)

src, warehouse, tenant, date, expected = sys.argv[1:6]
os.makedirs(warehouse, exist_ok=True)
catalog = SqlCatalog(
    "bench",
    uri=f"sqlite:///{warehouse}/catalog.db",
    warehouse=f"file://{os.path.abspath(warehouse)}",
)
catalog.create_namespace_if_not_exists("fhir")

schema = Schema(
    NestedField(1, "tenant_guid", StringType(), required=True),
    NestedField(2, "id", StringType(), required=True),
    NestedField(3, "resource_type", StringType(), required=True),
    NestedField(4, "version_id", StringType(), required=False),
    NestedField(5, "last_updated", TimestamptzType(), required=False),
    NestedField(6, "import_date", DateType(), required=True),
    NestedField(7, "job_id", StringType(), required=True),
    NestedField(8, "imported_at", TimestamptzType(), required=True),
    NestedField(9, "resource", StringType(), required=True),
)
spec = PartitionSpec(
    PartitionField(source_id=1, field_id=1000, transform=IdentityTransform(), name="tenant_guid")
)
arrow_schema = schema.as_arrow()

# Curated files are <Type>-processed[.NNN].ndjson.
files = defaultdict(list)
for name in sorted(os.listdir(src)):
    if name.endswith(".ndjson") and "-processed" in name:
        files[name.split("-processed")[0]].append(os.path.join(src, name))

job_id = str(uuid.uuid4())
now = datetime.datetime.now(datetime.timezone.utc)
day = datetime.date.fromisoformat(date)
# One column of whole lines: no delimiter or quote character occurs in NDJSON.
read = pacsv.ReadOptions(column_names=["resource"], block_size=1 << 26)
parse = pacsv.ParseOptions(delimiter="\x01", quote_char=False, escape_char=False)
convert = pacsv.ConvertOptions(column_types={"resource": pa.string()})
con = duckdb.connect()
total = 0
for ty, paths in files.items():
    lines = pa.concat_tables(
        pacsv.read_csv(p, read_options=read, parse_options=parse, convert_options=convert)
        for p in paths
    )
    keyed = con.sql(
        """SELECT ? AS tenant_guid,
                  json_extract_string(resource, '$.id') AS id,
                  ? AS resource_type,
                  json_extract_string(resource, '$.meta.versionId') AS version_id,
                  TRY_CAST(json_extract_string(resource, '$.meta.lastUpdated') AS TIMESTAMPTZ)
                      AS last_updated,
                  ?::DATE AS import_date, ? AS job_id, ?::TIMESTAMPTZ AS imported_at,
                  resource
           FROM lines""",
        params=[tenant, ty, day, job_id, now],
    ).to_arrow_table()
    table = catalog.create_table_if_not_exists(
        f"fhir.{ty.lower()}",
        schema=schema,
        partition_spec=spec,
        properties={"write.parquet.compression-codec": "snappy"},
    )
    table.append(keyed.cast(arrow_schema))
    total += keyed.num_rows

if total != int(expected):
    sys.exit(f"imported {total} rows, expected {expected}")
