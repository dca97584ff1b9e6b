"""The curate benchmark's peer: the same job in DuckDB, one SQL query.

It reads every raw NDJSON file, keeps one row per (resourceType, id) with the
same ordering as fhirflow's engine/src/curate/dedup.sql, sets the tenant label and
writes NDJSON. It is the least a peer must do: it re-serialises each resource
(not lossless), replaces meta.security instead of adding to it, keeps no
lineage and writes no metadata.

usage: peer_duckdb.py RAW_DIR OUT_FILE TENANT THREADS
"""
import sys

import duckdb

src, out, tenant, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
label = '{"system":"http://thirdopinion.io/identity/claims/tenant","code":"%s"}' % tenant
con = duckdb.connect()
con.execute(f"SET threads = {threads}")
con.execute(f"""
COPY (
  WITH src AS (
    SELECT json AS r, filename, row_number() OVER () AS ord
    FROM read_ndjson_objects('{src}/**/*.ndjson', filename = true, maximum_object_size = 100000000)
  ), keyed AS (
    SELECT r, filename, ord,
           json_extract_string(r, '$.resourceType') AS rt,
           json_extract_string(r, '$.id') AS id,
           json_extract_string(r, '$.meta.versionId') AS vid,
           json_extract_string(r, '$.meta.lastUpdated') AS lu
    FROM src
  ), ranked AS (
    SELECT *, row_number() OVER (
        PARTITION BY rt, id
        ORDER BY TRY_CAST(vid AS BIGINT) DESC NULLS LAST, vid DESC NULLS LAST,
                 lu DESC NULLS LAST, filename DESC, ord DESC) AS rn
    FROM keyed
  )
  SELECT json_merge_patch(r, '{{"meta":{{"security":[{label}]}}}}')::VARCHAR AS line
  FROM ranked WHERE rn = 1
) TO '{out}' (FORMAT csv, HEADER false, QUOTE '', ESCAPE '', DELIMITER '\\x01')
""")
