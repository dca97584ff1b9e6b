-- References to a Patient that is not in this tenant's data for this import
-- date: reject the record, or keep it (the default).
--
-- A record whose patient never arrives cannot be searched by patient in
-- HealthLake and usually means an export that was cut short. But an
-- incremental export (_since) legitimately sends an Observation whose
-- Patient did not change, so keeping is the default and rejecting is a
-- choice: rule_param missing_patient=reject (in [curate.rule_params] or
-- --rule-param). The two branches below are chosen by that constant: the
-- planner removes the other one, so keeping costs nothing.
--
-- `keys` holds every record of the tenant and date that passed steps 1
-- and 2. Contained (#...) and urn: references are not checked.
SELECT *, CAST(NULL AS VARCHAR) AS reject_reason
FROM records
WHERE rule_param('missing_patient', 'keep') <> 'reject'

UNION ALL

SELECT records.*,
       CASE WHEN missing.line_no IS NOT NULL
            THEN 'references Patient/' || missing.patient_id
                 || ', which is not in this tenant''s data for this import date'
       END AS reject_reason
FROM records
LEFT JOIN (
    SELECT refs.line_no, min(refs.patient_id) AS patient_id
    FROM (
        SELECT line_no, fhir_ref_id(ref) AS patient_id
        FROM (SELECT line_no, unnest(fhir_get_all(resource, 'descendants().reference')) AS ref
              FROM records
              WHERE strpos(resource, 'Patient/') > 0)
        WHERE fhir_ref_type(ref) = 'Patient'
    ) refs
    LEFT JOIN (SELECT id FROM keys WHERE resource_type = 'Patient') present
           ON present.id = refs.patient_id
    WHERE present.id IS NULL
    GROUP BY refs.line_no
) missing ON missing.line_no = records.line_no
WHERE rule_param('missing_patient', 'keep') = 'reject'
