-- 0007: the institution credit score (0005's formula, unchanged) with a region that depends only on
-- the data.
--
-- 0005 took any() of the regions of an institution's penalties *and* its alerts, and an alert about a
-- person carries the person's insured region: which one came out depended on the order rows were
-- read in (found by tests/system/test_event_identity.py, same events in another arrival order). An
-- institution's region is in its code (H or P, then the 6-digit GB/T 2260 region, 2019 coding
-- standard); for a code of another shape, the smallest region of its penalties and alerts.
--
-- 18.16 has no CREATE OR REPLACE VIEW: the view is dropped and created again (a view holds no data).
DROP TABLE IF EXISTS {db}.bi_institution_credit{on_cluster};
CREATE VIEW IF NOT EXISTS {db}.bi_institution_credit{on_cluster} AS
SELECT
    fixmedins_code,
    if(match(fixmedins_code, '^[HP][0-9]{11}$'), substring(fixmedins_code, 2, 6), min(admdvs_)) AS admdvs,
    sum(n_penalty) AS penalties,
    sum(fine) AS fines,
    sum(n_hit) AS rule_hits,
    toInt64(greatest(toInt64(0), toInt64(1000) - sum(penalty_pts)
        - least(toInt64(100), intDiv(toInt64(sum(fine)), toInt64(10000)))
        - least(toInt64(300), sum(hit_pts)))) AS score,
    multiIf(score >= 900, 'A', score >= 750, 'B', score >= 600, 'C', 'D') AS grade
FROM
(
    SELECT
        fixmedins_code,
        CAST(admdvs AS String) AS admdvs_,
        toUInt64(1) AS n_penalty,
        toDecimal64(fine_amt, 2) AS fine,
        toUInt64(0) AS n_hit,
        toInt64(multiIf(pnsh_type = 'WARNING', 20, pnsh_type = 'FINE', 50, pnsh_type = 'SUSPEND_AGREEMENT', 200,
                        pnsh_type = 'TERMINATE_AGREEMENT', 500, 0)) AS penalty_pts,
        toInt64(0) AS hit_pts
    FROM {db}.penalties{all}
    UNION ALL
    SELECT
        h_ AS fixmedins_code,
        admdvs_,
        toUInt64(0) AS n_penalty,
        toDecimal64(0, 2) AS fine,
        toUInt64(1) AS n_hit,
        toInt64(0) AS penalty_pts,
        toInt64(multiIf(severity_ = 'CRITICAL', 10, severity_ = 'HIGH', 5, severity_ = 'MEDIUM', 2, 1)) AS hit_pts
    FROM
    (
        SELECT
            alert_id,
            argMax(status, toUInt64(detected_at) * 2 + (status = 'RETRACTED')) AS status_,
            CAST(any(severity) AS String) AS severity_,
            any(fixmedins_code) AS h_,
            CAST(any(admdvs) AS String) AS admdvs_,
            CAST(any(subsystem) AS String) AS subsystem_
        FROM {db}.alerts{all}
        GROUP BY alert_id
    )
    WHERE status_ = 'FIRED' AND h_ != '' AND subsystem_ != 'supervision'
)
GROUP BY fixmedins_code;
