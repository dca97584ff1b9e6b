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
-- Output: the rows of every id that occurs more than once, each id's rows
-- together, its survivor first (the ORDER BY below is the survivor order).
-- The engine (dedup.rs) takes each id's first row as the survivor and the
-- others as its duplicates: a duplicate is *exact* when its content hash is
-- the survivor's. A duplicate from another source system than its
-- survivor's, with other content, is an id collision (two EHRs'
-- `Patient/123` need not be one patient): it is reported with the
-- survivor's source system, file and line.
--
-- Only ids that occur more than once are sorted. `repeated` finds them by
-- key_hash, which costs a fraction of grouping by the strings themselves; a
-- hash collision only adds rows to sort (the engine groups by the real
-- key), so it can never merge two ids.
--
-- `repeated` is the join's first input on purpose: the hash join holds its
-- first input in memory (it cannot spill) and streams the second, so what
-- it holds is one hash per repeated id, never the key rows themselves.
--
-- (A window ranking each id's rows - ROW_NUMBER and FIRST_VALUE over a
-- PARTITION BY - says the same, but DataFusion's window over tens of
-- thousands of two-row partitions took longer than the rest of dedup
-- together; one sort and a walk over it do not.)
WITH repeated AS (
    SELECT key_hash
    FROM keyed
    GROUP BY key_hash
    HAVING count(*) > 1
)
SELECT k.tenant_guid, k.resource_type, k.id, k.source_file, k.line_no,
       k.content_hash, k.source_system
FROM repeated r
JOIN keyed k ON k.key_hash = r.key_hash
ORDER BY k.tenant_guid, k.resource_type, k.id,
         -- the survivor first:
         TRY_CAST(k.version_id AS DECIMAL(38, 0)) DESC NULLS LAST,
         k.version_id DESC NULLS LAST,
         k.last_updated DESC NULLS LAST,
         k.import_date DESC,
         k.source_file DESC,
         k.line_no DESC
