-- Curation step 4, dedup: one survivor per (tenant, resourceType, id).
--
-- The survivor is the row with the highest meta.versionId (compared as a
-- number when it is one, else as text), then the latest meta.lastUpdated,
-- then the latest import date, source file and line. Every other row of the
-- group is a duplicate; it is an *exact* duplicate when its text is
-- byte-identical to the survivor's (same content hash).
--
-- Input: `keyed`, one row per record that passed the earlier steps, with the
-- record model's key and lineage columns and `content_hash` (xxh3-64 of the
-- line), but not the resource text: dedup needs only the keys, so its memory
-- grows with the number of records, not their size.
--
-- Output: one row per duplicate. The engine writes every other row.
SELECT source_file,
       line_no,
       resource_type,
       id,
       exact_duplicate
FROM (
    SELECT source_file,
           line_no,
           resource_type,
           id,
           ROW_NUMBER() OVER survivor_first AS survivor_rank,
           content_hash = FIRST_VALUE(content_hash) OVER survivor_first AS exact_duplicate
    FROM keyed
    WINDOW survivor_first AS (
        PARTITION BY tenant_guid, resource_type, id
        ORDER BY TRY_CAST(version_id AS DECIMAL(38, 0)) DESC NULLS LAST,
                 version_id DESC NULLS LAST,
                 last_updated DESC NULLS LAST,
                 import_date DESC,
                 source_file DESC,
                 line_no DESC
    )
) ranked
WHERE survivor_rank > 1
