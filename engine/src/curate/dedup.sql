-- Curation step 4, dedup: one survivor per (tenant, resourceType, id).
--
-- The survivor is the row with the highest meta.versionId (compared as a
-- number when it is one, else as text), then the latest meta.lastUpdated,
-- then the latest import date, source file and line. Every other row of the
-- group is a duplicate; it is an *exact* duplicate when its text is
-- byte-identical to the survivor's (same content hash).
--
-- Input: `keyed`, one row per record that passed the earlier steps, with the
-- record model's key and lineage columns, `content_hash` (xxh3-64 of the
-- line) and `key_hash` (xxh3-64 of tenant, resource type and id), but not the
-- resource text: dedup needs only the keys, so its memory grows with the
-- number of records, not their size.
--
-- Output: one row per duplicate. The engine writes every other row. A
-- duplicate from another source system than its survivor's, with other
-- content, is an id collision (two EHRs' `Patient/123` need not be one
-- patient): it comes with the survivor's source system, file and line.
--
-- Only ids that occur more than once are ranked. `repeated` finds them by
-- key_hash, which costs a fraction of grouping by the strings themselves; a
-- hash collision only adds rows to rank (the ranking partitions by the real
-- key), so it can never merge two ids.
--
-- `repeated` is the join's first input on purpose: the hash join holds its
-- first input in memory (it cannot spill) and streams the second, so what
-- it holds is one hash per repeated id, never the key rows themselves.
WITH repeated AS (
    SELECT key_hash
    FROM keyed
    GROUP BY key_hash
    HAVING count(*) > 1
),
ranked AS (
    SELECT k.source_file,
           k.line_no,
           k.resource_type,
           k.id,
           ROW_NUMBER() OVER survivor_first AS survivor_rank,
           k.content_hash = FIRST_VALUE(k.content_hash) OVER survivor_first AS exact_duplicate,
           CAST(k.source_system AS VARCHAR) AS source_system,
           CAST(FIRST_VALUE(k.source_system) OVER survivor_first AS VARCHAR) AS survivor_system,
           CAST(FIRST_VALUE(k.source_file) OVER survivor_first AS VARCHAR) AS survivor_file,
           FIRST_VALUE(k.line_no) OVER survivor_first AS survivor_line
    FROM repeated r
    JOIN keyed k ON k.key_hash = r.key_hash
    WINDOW survivor_first AS (
        PARTITION BY k.tenant_guid, k.resource_type, k.id
        ORDER BY TRY_CAST(k.version_id AS DECIMAL(38, 0)) DESC NULLS LAST,
                 k.version_id DESC NULLS LAST,
                 k.last_updated DESC NULLS LAST,
                 k.import_date DESC,
                 k.source_file DESC,
                 k.line_no DESC
    )
)
SELECT source_file, line_no, resource_type, id, exact_duplicate,
       NOT exact_duplicate AND source_system IS DISTINCT FROM survivor_system AS collision,
       source_system, survivor_system, survivor_file, survivor_line
FROM ranked
WHERE survivor_rank > 1
