-- 0003: aggregates for BI, and the bi_* views a BI tool (the HTML report, Grafana) queries directly.
--
-- Same DDL on ClickHouse 18.16 and chDB. What shaped it:
--
-- * Every aggregate is a SummingMergeTree fed by a materialized view on the raw table's STAGING
--   twin T_in, not on T. 18.16 does not cascade views: a row inserted into T_in reaches T through
--   T_in_mv, and a view on T never sees it (measured: only direct inserts into T fire it). So the
--   views below read the raw values of T_in (money as unscaled Int64, times as UInt32 epoch
--   seconds) and convert exactly as T_in_mv does: sum the integers, then
--   toDecimal128(sum, 0) * toDecimal128('0.01', 2). Money is Decimal(38, 2) everywhere, never Float.
--   Dropping and re-creating T_in (migrate's staging rebuild) keeps them attached: both engines
--   resolve a view's source by name at insert time (tested).
-- * Each aggregate table is created with CREATE TABLE IF NOT EXISTS ... AS SELECT over T, which
--   backfills what landed before this migration in the same statement, and only when the table is
--   new, so a repeated migrate never counts anything twice. Its view is created after it: run
--   migrate with the workers stopped (as always), or rows landing in between are not aggregated.
--   In cluster mode the statement runs on every shard over that shard's own T.
-- * SummingMergeTree merges lazily: a key can have several rows until a merge. Query aggregates
--   with sum(...) GROUP BY (never SELECT * and never trust one row per key), as the bi_* views do.
-- * No AggregatingMergeTree: AggregateFunction columns cannot be read by clickhouse-driver or the
--   chDB backend ("Unknown type AggregateFunction(...)"), so SELECT * on such a table would break
--   ad-hoc queries and the privacy scan, which reads every table whole. Everything needed here is
--   a sum or a count. Where a figure needs more than sums (alerts, supplier payments, contracts)
--   the bi_* view computes it from the raw table at query time and says why.
-- * Cluster mode (ON CLUSTER): every shard gets the aggregate tables and their views, fed by the
--   rows its own T_in receives, plus agg_*_all, a Distributed table over them (the cluster_only
--   statements). The bi_* views read {db}.X{all}, i.e. X_all in cluster mode: each node's bi_*
--   view sees the whole cluster, so there are no bi_*_all views.
-- * Reversals are settlement rows with negated money and refd_setl_flag = 1: sums are net of them,
--   and the settlement counts subtract one per reversal row. A reversal counts in the month (day)
--   of its own setl_time, which is how the fund books it, not in its original settlement's month.
-- * China time throughout: toStartOfMonth / toDate of a DateTime('Asia/Shanghai') value.
-- * 18.16 quirks worked around: arrayCumSum refuses Decimal and groupArray of a Decimal128 kills
--   the server process (so arrays carry Int64 fen, converted back exactly), no window functions
--   (arrays + ARRAY JOIN), no CTEs, JOINed subqueries carry aliases (chDB requires them), UNION ALL
--   branches have identical types (18.16 finds no common type for Int64 and UInt64).


-- ================================================================================================
-- Fund spending per pooling region x insurance type x month (from settlements).
--   settlements      Int64           net count: +1 per settlement row, -1 per reversal row
--   medfee_sumamt, fund_pay_sumamt, hifp_pay, inscp_amt, acct_pay, psn_cash_pay
--                    Decimal(38, 2)  net of reversals
CREATE TABLE IF NOT EXISTS {db}.agg_fund_spending_monthly{on_cluster}
ENGINE = SummingMergeTree((settlements, medfee_sumamt, fund_pay_sumamt, hifp_pay, inscp_amt, acct_pay, psn_cash_pay))
PARTITION BY toYear(month)
ORDER BY (insu_admdvs, insutype, month)
AS SELECT
    insu_admdvs,
    insutype,
    toStartOfMonth(setl_time) AS month,
    sum(if(refd_setl_flag = 1, -1, 1)) AS settlements,
    sum(medfee_sumamt) AS medfee_sumamt,
    sum(fund_pay_sumamt) AS fund_pay_sumamt,
    sum(hifp_pay) AS hifp_pay,
    sum(inscp_amt) AS inscp_amt,
    sum(acct_pay) AS acct_pay,
    sum(psn_cash_pay) AS psn_cash_pay
FROM {db}.settlements
GROUP BY insu_admdvs, insutype, month;

-- cluster_only
CREATE TABLE IF NOT EXISTS {db}.agg_fund_spending_monthly_all{on_cluster} AS {db}.agg_fund_spending_monthly
ENGINE = Distributed({cluster}, {db}, agg_fund_spending_monthly);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_fund_spending_monthly_mv{on_cluster}
TO {db}.agg_fund_spending_monthly
AS SELECT
    insu_admdvs,
    insutype,
    toStartOfMonth(CAST(setl_time AS DateTime('Asia/Shanghai'))) AS month,
    sum(if(refd_setl_flag = 1, -1, 1)) AS settlements,
    toDecimal128(sum(medfee_sumamt), 0) * toDecimal128('0.01', 2) AS medfee_sumamt,
    toDecimal128(sum(fund_pay_sumamt), 0) * toDecimal128('0.01', 2) AS fund_pay_sumamt,
    toDecimal128(sum(hifp_pay), 0) * toDecimal128('0.01', 2) AS hifp_pay,
    toDecimal128(sum(inscp_amt), 0) * toDecimal128('0.01', 2) AS inscp_amt,
    toDecimal128(sum(acct_pay), 0) * toDecimal128('0.01', 2) AS acct_pay,
    toDecimal128(sum(psn_cash_pay), 0) * toDecimal128('0.01', 2) AS psn_cash_pay
FROM {db}.settlements_in
GROUP BY insu_admdvs, insutype, month;


-- ================================================================================================
-- Fund income per pooling region x insurance type x month (from fund_income, by book_time).
--   incomes     UInt64          income records
--   income_amt  Decimal(38, 2)
CREATE TABLE IF NOT EXISTS {db}.agg_fund_income_monthly{on_cluster}
ENGINE = SummingMergeTree((incomes, income_amt))
PARTITION BY toYear(month)
ORDER BY (insu_admdvs, insutype, month)
AS SELECT
    insu_admdvs,
    insutype,
    toStartOfMonth(book_time) AS month,
    count() AS incomes,
    sum(income_amt) AS income_amt
FROM {db}.fund_income
GROUP BY insu_admdvs, insutype, month;

-- cluster_only
CREATE TABLE IF NOT EXISTS {db}.agg_fund_income_monthly_all{on_cluster} AS {db}.agg_fund_income_monthly
ENGINE = Distributed({cluster}, {db}, agg_fund_income_monthly);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_fund_income_monthly_mv{on_cluster}
TO {db}.agg_fund_income_monthly
AS SELECT
    insu_admdvs,
    insutype,
    toStartOfMonth(CAST(book_time AS DateTime('Asia/Shanghai'))) AS month,
    count() AS incomes,
    toDecimal128(sum(income_amt), 0) * toDecimal128('0.01', 2) AS income_amt
FROM {db}.fund_income_in
GROUP BY insu_admdvs, insutype, month;


-- ================================================================================================
-- Cross-province settlements per insured region x treatment region x day: only settlements whose
-- insu_admdvs and mdtrt_admdvs differ in their province (first two digits). Reversal rows carry
-- both regions of their original, so they net out here too.
--   settlements                     Int64           net count (reversal rows -1)
--   medfee_sumamt, fund_pay_sumamt  Decimal(38, 2)  net of reversals
CREATE TABLE IF NOT EXISTS {db}.agg_cross_province_daily{on_cluster}
ENGINE = SummingMergeTree((settlements, medfee_sumamt, fund_pay_sumamt))
PARTITION BY toYYYYMM(day)
ORDER BY (insu_admdvs, mdtrt_admdvs, day)
AS SELECT
    insu_admdvs,
    mdtrt_admdvs,
    toDate(setl_time) AS day,
    sum(if(refd_setl_flag = 1, -1, 1)) AS settlements,
    sum(medfee_sumamt) AS medfee_sumamt,
    sum(fund_pay_sumamt) AS fund_pay_sumamt
FROM {db}.settlements
WHERE substring(insu_admdvs, 1, 2) != substring(mdtrt_admdvs, 1, 2)
GROUP BY insu_admdvs, mdtrt_admdvs, day;

-- cluster_only
CREATE TABLE IF NOT EXISTS {db}.agg_cross_province_daily_all{on_cluster} AS {db}.agg_cross_province_daily
ENGINE = Distributed({cluster}, {db}, agg_cross_province_daily);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_cross_province_daily_mv{on_cluster}
TO {db}.agg_cross_province_daily
AS SELECT
    insu_admdvs,
    mdtrt_admdvs,
    toDate(CAST(setl_time AS DateTime('Asia/Shanghai'))) AS day,
    sum(if(refd_setl_flag = 1, -1, 1)) AS settlements,
    toDecimal128(sum(medfee_sumamt), 0) * toDecimal128('0.01', 2) AS medfee_sumamt,
    toDecimal128(sum(fund_pay_sumamt), 0) * toDecimal128('0.01', 2) AS fund_pay_sumamt
FROM {db}.settlements_in
WHERE substring(insu_admdvs, 1, 2) != substring(mdtrt_admdvs, 1, 2)
GROUP BY insu_admdvs, mdtrt_admdvs, day;


-- ================================================================================================
-- Cross-province filings (bei'an) per insured region x treatment area x day of filing (dcla_time).
-- Every row of cross_province_filings counts: the table holds nothing else.
--   filings  UInt64
CREATE TABLE IF NOT EXISTS {db}.agg_cross_province_filings_daily{on_cluster}
ENGINE = SummingMergeTree((filings))
PARTITION BY toYYYYMM(day)
ORDER BY (insu_admdvs, mdtrt_area_admdvs, day)
AS SELECT
    insu_admdvs,
    mdtrt_area_admdvs,
    toDate(dcla_time) AS day,
    count() AS filings
FROM {db}.cross_province_filings
GROUP BY insu_admdvs, mdtrt_area_admdvs, day;

-- cluster_only
CREATE TABLE IF NOT EXISTS {db}.agg_cross_province_filings_daily_all{on_cluster} AS {db}.agg_cross_province_filings_daily
ENGINE = Distributed({cluster}, {db}, agg_cross_province_filings_daily);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_cross_province_filings_daily_mv{on_cluster}
TO {db}.agg_cross_province_filings_daily
AS SELECT
    insu_admdvs,
    mdtrt_area_admdvs,
    toDate(CAST(dcla_time AS DateTime('Asia/Shanghai'))) AS day,
    count() AS filings
FROM {db}.cross_province_filings_in
GROUP BY insu_admdvs, mdtrt_area_admdvs, day;


-- ================================================================================================
-- Purchases per hospital x product x contract (from proc_orders), for the completion of the
-- volume-based procurement contracts. cntr_id is '' for orders outside any contract.
--   orders    UInt64
--   purc_cnt  Decimal(38, 4)  quantity purchased
--   purc_amt  Decimal(38, 2)
CREATE TABLE IF NOT EXISTS {db}.agg_proc_purchases{on_cluster}
ENGINE = SummingMergeTree((orders, purc_cnt, purc_amt))
ORDER BY (fixmedins_code, med_list_codg, cntr_id)
AS SELECT
    fixmedins_code,
    med_list_codg,
    cntr_id,
    count() AS orders,
    sum(purc_cnt) AS purc_cnt,
    sum(purc_amt) AS purc_amt
FROM {db}.proc_orders
GROUP BY fixmedins_code, med_list_codg, cntr_id;

-- cluster_only
CREATE TABLE IF NOT EXISTS {db}.agg_proc_purchases_all{on_cluster} AS {db}.agg_proc_purchases
ENGINE = Distributed({cluster}, {db}, agg_proc_purchases);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_proc_purchases_mv{on_cluster}
TO {db}.agg_proc_purchases
AS SELECT
    fixmedins_code,
    med_list_codg,
    cntr_id,
    count() AS orders,
    toDecimal128(sum(purc_cnt), 0) * toDecimal128('0.0001', 4) AS purc_cnt,
    toDecimal128(sum(purc_amt), 0) * toDecimal128('0.01', 2) AS purc_amt
FROM {db}.proc_orders_in
GROUP BY fixmedins_code, med_list_codg, cntr_id;


-- ================================================================================================
-- Accepted deliveries per hospital x month of acceptance (from proc_deliveries).
--   deliveries  UInt64
--   dlv_amt     Decimal(38, 2)
CREATE TABLE IF NOT EXISTS {db}.agg_proc_deliveries_monthly{on_cluster}
ENGINE = SummingMergeTree((deliveries, dlv_amt))
PARTITION BY toYear(month)
ORDER BY (fixmedins_code, month)
AS SELECT
    fixmedins_code,
    toStartOfMonth(acpt_time) AS month,
    count() AS deliveries,
    sum(dlv_amt) AS dlv_amt
FROM {db}.proc_deliveries
GROUP BY fixmedins_code, month;

-- cluster_only
CREATE TABLE IF NOT EXISTS {db}.agg_proc_deliveries_monthly_all{on_cluster} AS {db}.agg_proc_deliveries_monthly
ENGINE = Distributed({cluster}, {db}, agg_proc_deliveries_monthly);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_proc_deliveries_monthly_mv{on_cluster}
TO {db}.agg_proc_deliveries_monthly
AS SELECT
    fixmedins_code,
    toStartOfMonth(CAST(acpt_time AS DateTime('Asia/Shanghai'))) AS month,
    count() AS deliveries,
    toDecimal128(sum(dlv_amt), 0) * toDecimal128('0.01', 2) AS dlv_amt
FROM {db}.proc_deliveries_in
GROUP BY fixmedins_code, month;


-- ================================================================================================
-- Payments to suppliers (hui kuan) per hospital x month of payment (from supplier_payments).
--   payments  UInt64
--   pay_amt   Decimal(38, 2)
CREATE TABLE IF NOT EXISTS {db}.agg_supplier_payments_monthly{on_cluster}
ENGINE = SummingMergeTree((payments, pay_amt))
PARTITION BY toYear(month)
ORDER BY (fixmedins_code, month)
AS SELECT
    fixmedins_code,
    toStartOfMonth(pay_time) AS month,
    count() AS payments,
    sum(pay_amt) AS pay_amt
FROM {db}.supplier_payments
GROUP BY fixmedins_code, month;

-- cluster_only
CREATE TABLE IF NOT EXISTS {db}.agg_supplier_payments_monthly_all{on_cluster} AS {db}.agg_supplier_payments_monthly
ENGINE = Distributed({cluster}, {db}, agg_supplier_payments_monthly);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_supplier_payments_monthly_mv{on_cluster}
TO {db}.agg_supplier_payments_monthly
AS SELECT
    fixmedins_code,
    toStartOfMonth(CAST(pay_time AS DateTime('Asia/Shanghai'))) AS month,
    count() AS payments,
    toDecimal128(sum(pay_amt), 0) * toDecimal128('0.01', 2) AS pay_amt
FROM {db}.supplier_payments_in
GROUP BY fixmedins_code, month;


-- ================================================================================================
-- Supervision outcomes per region x month x kind x type, one table fed by four views:
--   kind 'inspection'  type = insp_type  cnt = inspections  amount = viol_amt (violations found)
--   kind 'tip'         type = tip_cat    cnt = tips         amount = 0 (a tip's amount is a claim)
--   kind 'penalty'     type = pnsh_type  cnt = penalties    amount = fine_amt
--   kind 'recovery'    type = ''         cnt = recoveries   amount = rcvr_amt
--   cnt UInt64, amount Decimal(38, 2). Month of insp_time / recv_time / pnsh_time / rcvr_time.
CREATE TABLE IF NOT EXISTS {db}.agg_supervision_monthly{on_cluster}
ENGINE = SummingMergeTree((cnt, amount))
PARTITION BY toYear(month)
ORDER BY (admdvs, month, kind, type)
AS SELECT admdvs, month, kind, type, cnt, amount
FROM
(
    SELECT
        admdvs,
        toStartOfMonth(insp_time) AS month,
        CAST('inspection' AS {lc}) AS kind,
        CAST(insp_type AS {lc}) AS type,
        count() AS cnt,
        sum(viol_amt) AS amount
    FROM {db}.inspections
    GROUP BY admdvs, month, insp_type
    UNION ALL
    SELECT
        admdvs,
        toStartOfMonth(recv_time) AS month,
        CAST('tip' AS {lc}) AS kind,
        CAST(tip_cat AS {lc}) AS type,
        count() AS cnt,
        toDecimal128(0, 2) AS amount
    FROM {db}.tips
    GROUP BY admdvs, month, tip_cat
    UNION ALL
    SELECT
        admdvs,
        toStartOfMonth(pnsh_time) AS month,
        CAST('penalty' AS {lc}) AS kind,
        CAST(pnsh_type AS {lc}) AS type,
        count() AS cnt,
        sum(fine_amt) AS amount
    FROM {db}.penalties
    GROUP BY admdvs, month, pnsh_type
    UNION ALL
    SELECT
        admdvs,
        toStartOfMonth(rcvr_time) AS month,
        CAST('recovery' AS {lc}) AS kind,
        CAST('' AS {lc}) AS type,
        count() AS cnt,
        sum(rcvr_amt) AS amount
    FROM {db}.fund_recoveries
    GROUP BY admdvs, month
);

-- cluster_only
CREATE TABLE IF NOT EXISTS {db}.agg_supervision_monthly_all{on_cluster} AS {db}.agg_supervision_monthly
ENGINE = Distributed({cluster}, {db}, agg_supervision_monthly);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_supervision_inspections_mv{on_cluster}
TO {db}.agg_supervision_monthly
AS SELECT
    admdvs,
    toStartOfMonth(CAST(insp_time AS DateTime('Asia/Shanghai'))) AS month,
    CAST('inspection' AS {lc}) AS kind,
    CAST(insp_type AS {lc}) AS type,
    count() AS cnt,
    toDecimal128(sum(viol_amt), 0) * toDecimal128('0.01', 2) AS amount
FROM {db}.inspections_in
GROUP BY admdvs, month, insp_type;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_supervision_tips_mv{on_cluster}
TO {db}.agg_supervision_monthly
AS SELECT
    admdvs,
    toStartOfMonth(CAST(recv_time AS DateTime('Asia/Shanghai'))) AS month,
    CAST('tip' AS {lc}) AS kind,
    CAST(tip_cat AS {lc}) AS type,
    count() AS cnt,
    toDecimal128(0, 2) AS amount
FROM {db}.tips_in
GROUP BY admdvs, month, tip_cat;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_supervision_penalties_mv{on_cluster}
TO {db}.agg_supervision_monthly
AS SELECT
    admdvs,
    toStartOfMonth(CAST(pnsh_time AS DateTime('Asia/Shanghai'))) AS month,
    CAST('penalty' AS {lc}) AS kind,
    CAST(pnsh_type AS {lc}) AS type,
    count() AS cnt,
    toDecimal128(sum(fine_amt), 0) * toDecimal128('0.01', 2) AS amount
FROM {db}.penalties_in
GROUP BY admdvs, month, pnsh_type;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_supervision_recoveries_mv{on_cluster}
TO {db}.agg_supervision_monthly
AS SELECT
    admdvs,
    toStartOfMonth(CAST(rcvr_time AS DateTime('Asia/Shanghai'))) AS month,
    CAST('recovery' AS {lc}) AS kind,
    CAST('' AS {lc}) AS type,
    count() AS cnt,
    toDecimal128(sum(rcvr_amt), 0) * toDecimal128('0.01', 2) AS amount
FROM {db}.fund_recoveries_in
GROUP BY admdvs, month;


-- ================================================================================================
-- BI VIEWS. Column names and meanings are a contract with yibao/report.py and the Grafana
-- dashboard: add columns in a new migration if needed, never rename or drop one.
-- ================================================================================================

-- bi_fund_health: fund operation per pooling region x insurance type x month (China months).
--   insu_admdvs         String          the pooling region (XXXX99), where fund income is booked;
--                                       settlements, which name the insured person's county, are
--                                       rolled up to it by their first four digits
--   insutype
--   month               Date            first day of the month
--   income              Decimal(38, 2)  fund_income.income_amt booked in the month
--   spending            Decimal(38, 2)  settlements' fund_pay_sumamt, net of reversals
--   current_balance     Decimal(38, 2)  income - spending
--   cumulative_balance  Decimal(38, 2)  running sum of current_balance over this region and
--                                       insurance type's months up to this one. It starts at the
--                                       first month on record: an opening balance from before the
--                                       pipeline is not in the data and is not added
--   months_capacity     Nullable(Float64)  months of payout capacity (ke zhi fu yue shu) =
--                                       cumulative_balance / (year-to-date spending / toMonth(month)),
--                                       year-to-date = January .. this month of the same year.
--                                       NULL when year-to-date spending is not > 0.
--                                       Below 3: warning (domain.md)
--   policy_ratio        Nullable(Float64)  hifp_pay / inscp_amt of the month (pooled-fund share of
--                                       in-scope costs). NULL when inscp_amt = 0
-- A month appears when it has income or spending. Cumulative and year-to-date sums are taken over
-- sorted arrays with arrayCumSum (18.16 has no window functions). The arrays carry Int64 fen, turned
-- back into Decimal exactly at the end: 18.16's arrayCumSum refuses Decimal, and its groupArray of
-- a Decimal128 crashes the server (measured: the process dies with the query).
CREATE VIEW IF NOT EXISTS {db}.bi_fund_health{on_cluster} AS
SELECT
    insu_admdvs,
    insutype,
    r.1 AS month,
    toDecimal128(r.2, 0) * toDecimal128('0.01', 2) AS income,
    toDecimal128(r.3, 0) * toDecimal128('0.01', 2) AS spending,
    toDecimal128(r.2 - r.3, 0) * toDecimal128('0.01', 2) AS current_balance,
    toDecimal128(cum_fen, 0) * toDecimal128('0.01', 2) AS cumulative_balance,
    if(r.6 > 0, toFloat64(cum_fen) * toMonth(r.1) / toFloat64(r.6), NULL) AS months_capacity,
    if(r.5 != 0, r.4 / r.5, NULL) AS policy_ratio
FROM
(
    SELECT
        insu_admdvs,
        insutype,
        arraySort(groupArray((month, income_fen, spending_fen, hifp_fen, inscp_fen, ytd_fen))) AS series,
        arrayCumSum(arrayMap(x -> x.2 - x.3, series)) AS cums
    FROM
    (
        SELECT
            insu_admdvs,
            insutype,
            y.1 AS month,
            y.2 AS income_fen,
            y.3 AS spending_fen,
            y.4 AS hifp_fen,
            y.5 AS inscp_fen,
            ytd AS ytd_fen
        FROM
        (
            SELECT
                insu_admdvs,
                insutype,
                arraySort(groupArray((month, income_fen, spending_fen, hifp_fen, inscp_fen))) AS year_series,
                arrayCumSum(arrayMap(x -> x.3, year_series)) AS ytds
            FROM
            (
                SELECT
                    pool AS insu_admdvs,
                    insutype,
                    month,
                    sum(income_fen) AS income_fen,
                    sum(spending_fen) AS spending_fen,
                    sum(hifp_fen) AS hifp_fen,
                    sum(inscp_fen) AS inscp_fen
                FROM
                (
                    SELECT
                        toString(insu_admdvs) AS pool,
                        insutype,
                        month,
                        toInt64(income_amt * 100) AS income_fen,
                        toInt64(0) AS spending_fen,
                        toInt64(0) AS hifp_fen,
                        toInt64(0) AS inscp_fen
                    FROM {db}.agg_fund_income_monthly{all}
                    UNION ALL
                    SELECT
                        concat(substring(toString(insu_admdvs), 1, 4), '99') AS pool,
                        insutype,
                        month,
                        toInt64(0) AS income_fen,
                        toInt64(fund_pay_sumamt * 100) AS spending_fen,
                        toInt64(hifp_pay * 100) AS hifp_fen,
                        toInt64(inscp_amt * 100) AS inscp_fen
                    FROM {db}.agg_fund_spending_monthly{all}
                )
                GROUP BY pool, insutype, month
            )
            GROUP BY insu_admdvs, insutype, toYear(month)
        )
        ARRAY JOIN year_series AS y, ytds AS ytd
    )
    GROUP BY insu_admdvs, insutype
)
ARRAY JOIN series AS r, cums AS cum_fen;

-- bi_alerts_by_rule: open intelligent-monitoring alerts per China day x rule x region.
--   day      Date    toDate(window_start): the day the window the alert judges begins (natural
--                    day, month start, stay start...), the same for every version of an alert
--   rule_id, admdvs
--   alerts   UInt64  alerts whose latest version is not RETRACTED
-- Why a view over the raw alerts table and no aggregate: alerts is a ReplacingMergeTree by alert_id
-- whose versions (FIRED, later RETRACTED, FIRED again in a new generation) collapse only at
-- merges. A view fed by inserts would count every version it sees, and could only subtract a
-- retraction by assuming each FIRED row arrived exactly once and before it. Deduplicating at
-- query time is exact at any moment, and alerts are few (a fraction of the settlements). The
-- latest version is argMax by (detected_at, src_offset) per alert_id, which is what FINAL keeps,
-- with ties on the second-precision detected_at broken by stream order. GROUP BY rather than FINAL
-- because it also works through the Distributed alerts_all in cluster mode (alerts are sharded by
-- alert_id, and a two-stage GROUP BY is exact whatever the sharding).
CREATE VIEW IF NOT EXISTS {db}.bi_alerts_by_rule{on_cluster} AS
SELECT
    toDate(a_window_start) AS day,
    a_rule_id AS rule_id,
    a_admdvs AS admdvs,
    count() AS alerts
FROM
(
    SELECT
        alert_id,
        argMax(status, (detected_at, src_offset)) AS a_status,
        argMax(rule_id, (detected_at, src_offset)) AS a_rule_id,
        argMax(admdvs, (detected_at, src_offset)) AS a_admdvs,
        argMax(window_start, (detected_at, src_offset)) AS a_window_start
    FROM {db}.alerts{all}
    GROUP BY alert_id
)
WHERE a_status != 'RETRACTED'
GROUP BY day, rule_id, admdvs;

-- bi_cross_province_flows: cross-province medical treatment per China day x insured region x
-- treatment region.
--   day              Date
--   insu_admdvs      insured region
--   mdtrt_admdvs     treatment region: a settlement's mdtrt_admdvs, a filing's mdtrt_area_admdvs
--   settlements      Int64           net count, only pairs differing in province (agg above)
--   medfee_sumamt    Decimal(38, 2)  net of reversals
--   fund_pay_sumamt  Decimal(38, 2)  net of reversals
--   filings          UInt64          cross-province filings dated that day (dcla_time)
-- Settlements and filings merge into one row where their codes coincide. A filing names the
-- treatment AREA, often a pooling-region code (e.g. 330199) where settlements name the hospital's
-- county, so roll up with substring(mdtrt_admdvs, 1, 2|4) to compare flows and filings.
CREATE VIEW IF NOT EXISTS {db}.bi_cross_province_flows{on_cluster} AS
SELECT
    day,
    insu_admdvs,
    mdtrt_admdvs,
    sum(settlements) AS settlements,
    sum(medfee_sumamt) AS medfee_sumamt,
    sum(fund_pay_sumamt) AS fund_pay_sumamt,
    sum(filings) AS filings
FROM
(
    SELECT
        day,
        insu_admdvs,
        mdtrt_admdvs,
        settlements,
        medfee_sumamt,
        fund_pay_sumamt,
        toUInt64(0) AS filings
    FROM {db}.agg_cross_province_daily{all}
    UNION ALL
    SELECT
        day,
        insu_admdvs,
        mdtrt_area_admdvs AS mdtrt_admdvs,
        toInt64(0) AS settlements,
        toDecimal128(0, 2) AS medfee_sumamt,
        toDecimal128(0, 2) AS fund_pay_sumamt,
        filings
    FROM {db}.agg_cross_province_filings_daily{all}
)
GROUP BY day, insu_admdvs, mdtrt_admdvs;

-- bi_procurement_completion: completion of each volume-based procurement contract line.
--   fixmedins_code, med_list_codg, cntr_id
--   agreed_volume  Decimal(16, 4)  from the contract's latest version (argMax by sign_time)
--   purchased      Decimal(38, 4)  sum of purc_cnt of orders under this cntr_id, this hospital and
--                                  product (0 when none)
--   completion_pct Nullable(Float64)  purchased / agreed_volume * 100, NULL when agreed_volume = 0
--   elapsed_pct    Float64         share of the contract cycle elapsed at today (China date):
--                                  (today - cycle_begn_date) / (cycle_end_date - cycle_begn_date) * 100
--                                  clamped to 0..100 (a one-day cycle: 0 before it, 100 from its day)
--   lag_points     Nullable(Float64)  elapsed_pct - completion_pct. More than 10: warning (domain.md)
-- One row per contract line in proc_contracts, purchases or not. A view over the raw contracts
-- because the contract's own fields (volume, cycle) are not sums, joined to agg_proc_purchases.
CREATE VIEW IF NOT EXISTS {db}.bi_procurement_completion{on_cluster} AS
SELECT
    fixmedins_code,
    med_list_codg,
    cntr_id,
    agreed_volume,
    purchased,
    if(agreed_volume > 0, toFloat64(purchased) * 100 / toFloat64(agreed_volume), NULL) AS completion_pct,
    if(c_end > c_begn,
       greatest(0., least(100., (toInt32(c_today) - toInt32(c_begn)) * 100 / (toInt32(c_end) - toInt32(c_begn)))),
       if(c_today >= c_begn, 100., 0.)) AS elapsed_pct,
    elapsed_pct - completion_pct AS lag_points
FROM
(
    SELECT
        fixmedins_code,
        med_list_codg,
        cntr_id,
        agreed_volume,
        purchased,
        c_begn,
        c_end,
        toDate(now(), 'Asia/Shanghai') AS c_today
    FROM
    (
        SELECT
            fixmedins_code,
            med_list_codg,
            cntr_id,
            argMax(agreed_volume, sign_time) AS agreed_volume,
            argMax(cycle_begn_date, sign_time) AS c_begn,
            argMax(cycle_end_date, sign_time) AS c_end
        FROM {db}.proc_contracts{all}
        GROUP BY fixmedins_code, med_list_codg, cntr_id
    ) AS c
    ANY LEFT JOIN
    (
        SELECT
            fixmedins_code,
            med_list_codg,
            cntr_id,
            sum(purc_cnt) AS purchased
        FROM {db}.agg_proc_purchases{all}
        WHERE cntr_id != ''
        GROUP BY fixmedins_code, med_list_codg, cntr_id
    ) AS p USING (fixmedins_code, med_list_codg, cntr_id)
);

-- bi_procurement_savings: price cuts and savings of volume-based procurement against the baseline
-- price (domain.md: price cut = 1 - winning price / baseline price; savings = sum of the price
-- difference times the volume bought).
--   fixmedins_code, med_list_codg, cntr_id
--   win_pric        Decimal(16, 6)  winning price, from the contract's latest version
--   base_pric       Decimal(16, 6)  baseline price before procurement, same version
--   price_cut_pct   Nullable(Float64)  (1 - win_pric / base_pric) * 100, NULL when base_pric = 0
--   purchased       Decimal(38, 4)  sum of purc_cnt of orders under the contract (0 when none)
--   purchased_amt   Decimal(38, 2)  what those orders cost (sum of purc_amt)
--   savings         Decimal(38, 2)  purchased at the baseline price minus purchased_amt, i.e. the
--                                   sum of (base_pric - purc_pric) x purc_cnt, in yuan: exact decimal
--                                   arithmetic (scale 10), cut to the fen at the end. Both factors
--                                   are Decimal128: 18.16 gets Decimal64 x Decimal128 wrong
--                                   (measured: 10 x 120.5 = 1.205E-11)
CREATE VIEW IF NOT EXISTS {db}.bi_procurement_savings{on_cluster} AS
SELECT
    fixmedins_code,
    med_list_codg,
    cntr_id,
    win_pric,
    base_pric,
    if(base_pric > 0, (1 - toFloat64(win_pric) / toFloat64(base_pric)) * 100, NULL) AS price_cut_pct,
    purchased,
    purchased_amt,
    toDecimal128(toDecimal128(base_pric, 6) * purchased - purchased_amt, 2) AS savings
FROM
(
    SELECT
        fixmedins_code,
        med_list_codg,
        cntr_id,
        win_pric,
        base_pric,
        purchased,
        purchased_amt
    FROM
    (
        SELECT
            fixmedins_code,
            med_list_codg,
            cntr_id,
            argMax(win_pric, sign_time) AS win_pric,
            argMax(base_pric, sign_time) AS base_pric
        FROM {db}.proc_contracts{all}
        GROUP BY fixmedins_code, med_list_codg, cntr_id
    ) AS c
    ANY LEFT JOIN
    (
        SELECT
            fixmedins_code,
            med_list_codg,
            cntr_id,
            sum(purc_cnt) AS purchased,
            sum(purc_amt) AS purchased_amt
        FROM {db}.agg_proc_purchases{all}
        WHERE cntr_id != ''
        GROUP BY fixmedins_code, med_list_codg, cntr_id
    ) AS p USING (fixmedins_code, med_list_codg, cntr_id)
);

-- bi_supplier_payments: hospitals paying suppliers for accepted deliveries (hui kuan), per
-- hospital x month of acceptance (China months).
--   fixmedins_code
--   month                  Date     first day of the month of acpt_time
--   deliveries             UInt64   accepted deliveries
--   delivered_amt          Decimal(38, 2)  their dlv_amt
--   paid_deliveries        UInt64   deliveries with at least one payment (any time so far)
--   on_time                UInt64   deliveries paid in full within 30 days (30 x 24 h) of acpt_time:
--                                   the payments made by then add up to at least dlv_amt
--   on_time_rate           Nullable(Float64)  on_time / (paid_deliveries + overdue_unpaid): the
--                                   share on time among deliveries whose outcome is known (unpaid
--                                   ones still inside their 30 days are left out). NULL when none
--   weighted_avg_pay_days  Nullable(Float64)  amount-weighted average days from acceptance to
--                                   payment, sum(pay_amt * days) / sum(pay_amt) over the payments
--                                   of these deliveries. NULL when nothing is paid
--   overdue_unpaid         UInt64   deliveries accepted more than 30 days before now() without
--                                   any payment
-- A view over the raw proc_deliveries and supplier_payments: whether a payment was on time
-- depends on its delivery's acceptance time, known only when both have landed (payments come
-- weeks later), so it cannot be summed incrementally. Payments whose dlv_id matches no delivery
-- are left out. agg_proc_deliveries_monthly / agg_supplier_payments_monthly give cheap volumes.
CREATE VIEW IF NOT EXISTS {db}.bi_supplier_payments{on_cluster} AS
SELECT
    fixmedins_code,
    month,
    count() AS deliveries,
    sum(dlv_amt) AS delivered_amt,
    countIf(n_pay > 0) AS paid_deliveries,
    countIf(n_pay > 0 AND paid_by_due_fen >= dlv_fen) AS on_time,
    if(paid_deliveries + overdue_unpaid > 0, on_time / (paid_deliveries + overdue_unpaid), NULL) AS on_time_rate,
    if(sum(paid_amt) > 0, toFloat64(sum(amt_secs)) / toFloat64(sum(paid_amt)) / 86400, NULL) AS weighted_avg_pay_days,
    countIf(n_pay = 0 AND acpt_ts + 2592000 < toUInt32(now())) AS overdue_unpaid
FROM
(
    SELECT
        fixmedins_code,
        toStartOfMonth(acpt_time) AS month,
        toUInt32(acpt_time) AS acpt_ts,
        dlv_amt,
        toInt64(toDecimal128(dlv_amt, 2) * 100) AS dlv_fen,
        n_pay,
        paid_amt,
        arraySum(arrayFilter((a, t) -> t <= acpt_ts + 2592000, pay_fen, pay_ts)) AS paid_by_due_fen,
        amt_ts - paid_amt * acpt_ts AS amt_secs
    FROM
    (
        SELECT dlv_id, fixmedins_code, acpt_time, dlv_amt
        FROM {db}.proc_deliveries{all}
    ) AS d
    ANY LEFT JOIN
    (
        SELECT
            dlv_id,
            count() AS n_pay,
            sum(toDecimal128(pay_amt, 2)) AS paid_amt,
            sum(toDecimal128(pay_amt, 2) * toUInt32(pay_time)) AS amt_ts,
            groupArray(toInt64(toDecimal128(pay_amt, 2) * 100)) AS pay_fen,
            groupArray(toUInt32(pay_time)) AS pay_ts
        FROM {db}.supplier_payments{all}
        GROUP BY dlv_id
    ) AS p USING (dlv_id)
)
GROUP BY fixmedins_code, month;

-- bi_supervision_outcomes: fund supervision per region x month x kind x type (agg above).
--   admdvs
--   month   Date
--   kind    'inspection' | 'tip' | 'penalty' | 'recovery'
--   type    insp_type | tip_cat | pnsh_type | '' for recoveries
--   cnt     UInt64          inspections, tips, penalties, recoveries
--   amount  Decimal(38, 2)  violation amount found | 0 | fines | recovered funds
CREATE VIEW IF NOT EXISTS {db}.bi_supervision_outcomes{on_cluster} AS
SELECT
    admdvs,
    month,
    kind,
    type,
    sum(cnt) AS cnt,
    sum(amount) AS amount
FROM {db}.agg_supervision_monthly{all}
GROUP BY admdvs, month, kind, type;
