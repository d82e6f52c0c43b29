-- 0004: institution credit score (信用评价) as a view over penalties and the alerts table.
--
-- score = max(0, 1000 - penalty points - fine points - rule-hit points), per institution:
--   penalty points:  WARNING 20, FINE 50, SUSPEND_AGREEMENT 200, TERMINATE_AGREEMENT 500 (each penalty)
--   fine points:     1 per full 10,000 yuan fined in total, at most 100
--   rule-hit points: per alert whose latest status is FIRED (retracted alerts do not count):
--                    LOW 1, MEDIUM 2, HIGH 5, CRITICAL 10, at most 300 in total (rule hits are
--                    suspicions, not findings: volume alone must not sink a large hospital)
-- grade: A >= 900, B >= 750, C >= 600, D below.
-- Only institutions with a penalty or an open rule hit appear; any other scores 1000 (A).
-- tests/test_monitors.py computes the same in Python and compares it with the view on both engines.
--
-- Plain SQL that ClickHouse 18.16 and chDB both accept (no CTE, no window functions); the two
-- UNION ALL branches give their columns identical types, which 18.16 insists on. In cluster mode
-- the view reads the node's local tables (its shard); query it per shard or via the _all tables.
CREATE VIEW IF NOT EXISTS {db}.bi_institution_credit{on_cluster} AS
SELECT
    fixmedins_code,
    any(admdvs_) AS admdvs,
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
    FROM {db}.penalties
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
            CAST(any(admdvs) AS String) AS admdvs_
        FROM {db}.alerts
        GROUP BY alert_id
    )
    WHERE status_ = 'FIRED' AND h_ != ''
)
GROUP BY fixmedins_code;
