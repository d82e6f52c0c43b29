-- 0009: the pre-settlement check (shi qian ti shi, issue 15): its log, and the view saying which
-- prompts were heeded. Placeholders and 18.16 limits as in 0001 and 0003.

-- One row per answered check (streams/precheck), written by the worker through precheck_log_in
-- (migrate builds it from TABLES, as for every raw table). Not an Avro event and not written by any
-- stream processor: src_partition is the settlement partition the person maps to, src_offset 0.
-- The person is only psn_token (clear psn_no is never stored). setl_id is what the hospital sent
-- (possibly provisional). hit_rule_ids, hit_rule_versions, hit_severities and hit_items are
-- parallel, one element per hit; hit_items[i] is the comma-joined hilist_codes of the fee lines
-- hit i concerns, '' when it concerns the settlement as a whole (e.g. doctor shopping).
CREATE TABLE IF NOT EXISTS {db}.precheck_log{on_cluster}
(
    check_id           String,
    checked_at         DateTime('Asia/Shanghai'),
    caller             {lc},
    fixmedins_code     String,
    insu_admdvs        {lc},
    med_type           {lc},
    psn_token          String,
    mdtrt_id           String,
    setl_id            String,
    medfee_sumamt      Decimal(16, 2),
    items              Array(String),
    hit_rule_ids       Array(String),
    hit_rule_versions  Array(Int32),
    hit_severities     Array(String),
    hit_items          Array(String),
    src_partition      UInt16,
    src_offset         UInt64,
    ingested_at        DateTime('Asia/Shanghai') DEFAULT now()
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(checked_at)
ORDER BY (fixmedins_code, mdtrt_id, checked_at);

-- The view below reads precheck_log_all in cluster mode, and a view cannot be created over a table
-- that does not exist yet (18.16: Code 60). migrate's staging step, which makes the _all twin of
-- every raw table, runs after this file; it rebuilds this table then, as it does for the others.
-- cluster_only
CREATE TABLE IF NOT EXISTS {db}.precheck_log_all{on_cluster} AS {db}.precheck_log
ENGINE = Distributed({cluster}, {db}, precheck_log);


-- bi_precheck_outcomes: which prompts of the pre-settlement check were heeded. One row per China
-- month of checked_at x fixmedins_code x rule_id. Every hit (one element of a check's hit arrays)
-- is linked to the REAL settlement(s) of the same visit: settlements rows with the same
-- (fixmedins_code, mdtrt_id, psn_token), refd_setl_flag = 0, that LANDED at or after the check
-- (settlements.ingested_at >= checked_at). Landing time, not setl_time: a hospital may check a
-- settlement whose setl_time lies in the past or future of the worker's clock. The setl_id the
-- hospital sent is not used (it may be provisional). Their fee lines are the fee_details rows of
-- those settlements (by setl_id).
--   month           Date    China month of checked_at
--   fixmedins_code  String
--   rule_id         String
--   checks          UInt64  distinct checks (check_id) with at least one hit of this rule
--   prompts         UInt64  hits shown (a check may hit one rule on several lines)
--   removed         UInt64  hits whose visit settled and that name items, none of which is on a
--                           fee line of the linked settlements
--   settled_anyway  UInt64  other hits whose visit settled: at least one of the items is still
--                           there, or the hit names no item (it concerns the settlement as a whole)
--   pending         UInt64  hits whose visit has no linked settlement yet
--   items_removed   UInt64  the hits' items absent from the linked settlements' fee lines, summed
--                           (0 for a pending hit: nothing has been removed from a visit not settled)
-- removed + settled_anyway + pending = prompts. Only checks with hits appear; hit arrays shorter
-- than hit_rule_ids count as ''.
-- How, on 18.16: no CTE and only equi-joins, so each visit's settlements and fee lines come as
-- arrays (one row per checked visit: the GLOBAL IN reads only those) and the linking is done with
-- arrayFilter. A lambda there never uses a column from outside it: 18.16 prunes a subquery column
-- that only a lambda refers to ("Unknown identifier"), so replicate() hands it in as an argument.
-- Both sides of each JOIN are subqueries, so in cluster mode no Distributed table is the left side.
DROP TABLE IF EXISTS {db}.bi_precheck_outcomes{on_cluster};
CREATE VIEW IF NOT EXISTS {db}.bi_precheck_outcomes{on_cluster} AS
SELECT
    month,
    fixmedins_code,
    rule_id,
    uniqExact(check_id) AS checks,
    count() AS prompts,
    countIf(settled AND n_items > 0 AND n_missing = n_items) AS removed,
    countIf(settled AND NOT (n_items > 0 AND n_missing = n_items)) AS settled_anyway,
    countIf(NOT settled) AS pending,
    sum(if(settled, n_missing, 0)) AS items_removed
FROM
(
    SELECT month, fixmedins_code, check_id, settled, rule_id, length(hit_codes) AS n_items, n_missing
    FROM
    (
        SELECT
            month,
            fixmedins_code,
            check_id,
            hit_rule_ids,
            arrayMap(h -> arrayFilter(c -> c != '', splitByChar(',', h)),
                     arrayResize(hit_items, length(hit_rule_ids), '')) AS hit_code_lists,
            arrayFilter((sid, t, c) -> t >= c, s_setl_ids, s_landed_ts, replicate(checked_ts, s_landed_ts))
                AS linked_setl_ids,
            notEmpty(linked_setl_ids) AS settled,
            arrayFilter((c, sid, l) -> has(l, sid), f_codes, f_setl_ids, replicate(linked_setl_ids, f_setl_ids))
                AS present_codes,
            arrayMap((h, p) -> length(arrayFilter((c, q) -> NOT has(q, c), h, replicate(p, h))),
                     hit_code_lists, replicate(present_codes, hit_code_lists)) AS hit_missing
        FROM
        (
            SELECT
                fixmedins_code,
                mdtrt_id,
                psn_token,
                check_id,
                toStartOfMonth(checked_at) AS month,
                toUInt32(checked_at) AS checked_ts,
                hit_rule_ids,
                hit_items,
                s_setl_ids,
                s_landed_ts
            FROM
            (
                SELECT fixmedins_code, mdtrt_id, psn_token, check_id, checked_at, hit_rule_ids, hit_items
                FROM {db}.precheck_log{all}
                WHERE notEmpty(hit_rule_ids)
            ) AS p
            ANY LEFT JOIN
            (
                SELECT
                    fixmedins_code,
                    mdtrt_id,
                    psn_token,
                    groupArray(setl_id) AS s_setl_ids,
                    groupArray(toUInt32(ingested_at)) AS s_landed_ts
                FROM {db}.settlements{all}
                WHERE refd_setl_flag = 0
                  AND (fixmedins_code, mdtrt_id, psn_token) GLOBAL IN
                      (SELECT fixmedins_code, mdtrt_id, psn_token FROM {db}.precheck_log{all})
                GROUP BY fixmedins_code, mdtrt_id, psn_token
            ) AS s USING (fixmedins_code, mdtrt_id, psn_token)
        ) AS ps
        ANY LEFT JOIN
        (
            SELECT
                fixmedins_code,
                mdtrt_id,
                psn_token,
                groupArray(setl_id) AS f_setl_ids,
                groupArray(hilist_code) AS f_codes
            FROM {db}.fee_details{all}
            WHERE (fixmedins_code, mdtrt_id, psn_token) GLOBAL IN
                  (SELECT fixmedins_code, mdtrt_id, psn_token FROM {db}.precheck_log{all})
            GROUP BY fixmedins_code, mdtrt_id, psn_token
        ) AS f USING (fixmedins_code, mdtrt_id, psn_token)
    )
    ARRAY JOIN
        hit_rule_ids AS rule_id,
        hit_code_lists AS hit_codes,
        hit_missing AS n_missing
)
GROUP BY month, fixmedins_code, rule_id;
