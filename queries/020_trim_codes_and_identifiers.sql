-- Trims leading and trailing whitespace from codes and identifier values.
--
-- Some sources pad them (" 8867-4", "MRN-12 "); the padded value then never
-- matches the same code or identifier in searches, joins and dedup of other
-- systems. FHIR forbids the whitespace in codes and says strings should not
-- carry it. Only the padded strings change, byte for byte; nothing else in
-- the resource does. (With validation = "strict" a padded code is already
-- rejected in step 2; this rule then fixes identifiers, and codes under
-- "structure-only".)
SELECT * REPLACE (
    fhir_trim(resource,
              'code', 'descendants().code',
              'identifier.value', 'descendants().identifier.value') AS resource)
FROM records
