-- 0008: BI figures over the period the data cover, and cross-province flows that join filings and
-- settlements at one region level (the pooling region). Every view keeps its columns (a contract:
-- never renamed; bi_procurement_completion and bi_supplier_payments gain an as_of column). 18.16 has
-- no CREATE OR REPLACE VIEW, so each view is dropped and created again (a view holds no data). Same
-- DDL on ClickHouse 18.16 and chDB.
--
-- * bi_fund_health divided year-to-date spending by toMonth(month), as if the data began in
--   January: a pipeline that starts in October (or the demo's simulated week) showed 10 × (for a
--   week's data 10 × 4.4 ×) the capacity the fund has, 380-2,314 months on the demo's data. Months
--   elapsed are now the part of the year the data cover, a partial month by its share of days; over
--   data that cover the year they are toMonth(month), as before. The days come from a new
--   aggregate, agg_settlement_days (one row per China day), so the view reads no raw table.
-- * bi_cross_province_flows put settlements (insured county -> county of the hospital) and filings
--   (insured region -> treatment AREA, a pooling-region code XXXX99) side by side with their own
--   codes, so no pair had both (57 settlement-only pairs, 64 filing-only on the demo's data). Both
--   sides are now rolled up to the pooling region; the monthly view follows.
-- * bi_procurement_completion and bi_supplier_payments judged at today's date, so data that end in
--   the past showed every contract falling behind and every delivery of their last 30 days overdue
--   by the days since (the demo: 921 of 1,405 contracts "lagging" while YB-PROC-VOLUME-LAG, judging
--   in event time, raised none). They now judge as of the latest order or contract (acceptance or
--   payment) on record, or today if that is earlier: the same as before on live data.


-- ================================================================================================
-- Settlement rows per China day (reversal rows included): which days the data covers.
--   settlements  UInt64
CREATE TABLE IF NOT EXISTS {db}.agg_settlement_days{on_cluster}
ENGINE = SummingMergeTree((settlements))
ORDER BY day
AS SELECT
    toDate(setl_time) AS day,
    count() AS settlements
FROM {db}.settlements
GROUP BY day;

-- cluster_only
CREATE TABLE IF NOT EXISTS {db}.agg_settlement_days_all{on_cluster} AS {db}.agg_settlement_days
ENGINE = Distributed({cluster}, {db}, agg_settlement_days);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_settlement_days_mv{on_cluster}
TO {db}.agg_settlement_days
AS SELECT
    toDate(CAST(setl_time AS DateTime('Asia/Shanghai'))) AS day,
    count() AS settlements
FROM {db}.settlements_in
GROUP BY day;


-- bi_fund_health: fund operation per pooling region x insurance type x month (China months).
-- Columns and their meaning as in 0003, except months_capacity:
--   months_capacity     Nullable(Float64)  months of payout capacity (ke zhi fu yue shu) =
--                                       cumulative_balance / (year-to-date spending / months elapsed)
--                                       months elapsed = the part of this month's year, up to the end
--                                       of this month, that lies between the first and the last China
--                                       day with settlements on record (agg_settlement_days, all
--                                       regions), in months: whole months count 1, a partial month
--                                       its days / the month's days. Over data covering January ..
--                                       this month it is toMonth(month); a 7-day October run gives
--                                       7/31. NULL when year-to-date spending or months elapsed is not
--                                       > 0. Below 3: warning (domain.md). YB-FUND-CAPACITY judges
--                                       closed months counting whole months with data: the same
--                                       figure wherever the data cover whole months.
DROP TABLE IF EXISTS {db}.bi_fund_health{on_cluster};
CREATE VIEW IF NOT EXISTS {db}.bi_fund_health{on_cluster} AS
SELECT
    insu_admdvs,
    insutype,
    month,
    income,
    spending,
    current_balance,
    cumulative_balance,
    if(ytd_fen > 0 AND months_elapsed > 0, toFloat64(cum_fen) * months_elapsed / toFloat64(ytd_fen), NULL)
        AS months_capacity,
    policy_ratio
FROM
(
    SELECT
        insu_admdvs,
        insutype,
        r.1 AS month,
        toDecimal128(r.2, 0) * toDecimal128('0.01', 2) AS income,
        toDecimal128(r.3, 0) * toDecimal128('0.01', 2) AS spending,
        toDecimal128(r.2 - r.3, 0) * toDecimal128('0.01', 2) AS current_balance,
        toDecimal128(cum_fen, 0) * toDecimal128('0.01', 2) AS cumulative_balance,
        cum_fen,
        r.6 AS ytd_fen,
        greatest(toStartOfYear(r.1), d_min) AS e_first,
        least(addDays(addMonths(r.1, 1), -1), d_max) AS e_last,
        if(e_last >= e_first,
           toMonth(e_last) - toMonth(e_first)
             + toDayOfMonth(e_last) / toDayOfMonth(addDays(addMonths(toStartOfMonth(e_last), 1), -1))
             - (toDayOfMonth(e_first) - 1) / toDayOfMonth(addDays(addMonths(toStartOfMonth(e_first), 1), -1)),
           0.) AS months_elapsed,
        if(r.5 != 0, r.4 / r.5, NULL) AS policy_ratio
    FROM
    (
        SELECT insu_admdvs, insutype, series, cums, d_min, d_max
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
        ) AS f
        CROSS JOIN
        (
            SELECT min(day) AS d_min, max(day) AS d_max
            FROM {db}.agg_settlement_days{all}
        ) AS d
    )
    ARRAY JOIN series AS r, cums AS cum_fen
);


-- bi_cross_province_flows: cross-province medical treatment per China day x insured pooling region
-- x treatment pooling region. Region level: the POOLING REGION (tong chou qu) on both sides, in the
-- national XXXX99 convention (first four digits of the county code + '99', as the fund views and
-- the monitors' pool do); a province-level code (XX9900, XX0000) stays as it is. Filings are made
-- with the insured person's pooling agency and name the treatment area as a pool, so this is the
-- one level at which a pair has both settlements and filings.
--   day              Date
--   insu_admdvs      String          insured pooling region: pool of a settlement's insu_admdvs, of
--                                    a filing's insu_admdvs
--   mdtrt_admdvs     String          treatment pooling region: pool of a settlement's mdtrt_admdvs
--                                    (the hospital's county), of a filing's mdtrt_area_admdvs
--   settlements      Int64           net count, only settlements whose regions differ in province
--   medfee_sumamt    Decimal(38, 2)  net of reversals
--   fund_pay_sumamt  Decimal(38, 2)  net of reversals
--   filings          UInt64          cross-province filings dated that day (dcla_time)
-- County detail stays in agg_cross_province_daily (and settlements) for whoever needs it.
DROP TABLE IF EXISTS {db}.bi_cross_province_flows_monthly{on_cluster};
DROP TABLE IF EXISTS {db}.bi_cross_province_flows{on_cluster};
CREATE VIEW IF NOT EXISTS {db}.bi_cross_province_flows{on_cluster} AS
SELECT
    day,
    if(substring(i_, 3, 4) IN ('9900', '0000'), i_, concat(substring(i_, 1, 4), '99')) AS insu_admdvs,
    if(substring(m_, 3, 4) IN ('9900', '0000'), m_, concat(substring(m_, 1, 4), '99')) AS mdtrt_admdvs,
    sum(n_setl) AS settlements,
    sum(medfee_) AS medfee_sumamt,
    sum(fund_) AS fund_pay_sumamt,
    sum(n_filing) AS filings
FROM
(
    SELECT
        day,
        toString(insu_admdvs) AS i_,
        toString(mdtrt_admdvs) AS m_,
        settlements AS n_setl,
        medfee_sumamt AS medfee_,
        fund_pay_sumamt AS fund_,
        toUInt64(0) AS n_filing
    FROM {db}.agg_cross_province_daily{all}
    UNION ALL
    SELECT
        day,
        toString(insu_admdvs) AS i_,
        toString(mdtrt_area_admdvs) AS m_,
        toInt64(0) AS n_setl,
        toDecimal128(0, 2) AS medfee_,
        toDecimal128(0, 2) AS fund_,
        filings AS n_filing
    FROM {db}.agg_cross_province_filings_daily{all}
)
GROUP BY day, insu_admdvs, mdtrt_admdvs;

-- bi_cross_province_flows_monthly: the day view summed per China month (as 0006 made it), at the
-- same pooling-region level.
CREATE VIEW IF NOT EXISTS {db}.bi_cross_province_flows_monthly{on_cluster} AS
SELECT
    toStartOfMonth(day) AS month,
    insu_admdvs,
    mdtrt_admdvs,
    sum(settlements) AS settlements,
    sum(medfee_sumamt) AS medfee_sumamt,
    sum(fund_pay_sumamt) AS fund_pay_sumamt,
    sum(filings) AS filings
FROM {db}.bi_cross_province_flows
GROUP BY month, insu_admdvs, mdtrt_admdvs;


-- bi_procurement_completion: completion of each volume-based procurement contract line, as 0003
-- made it, judged AS OF THE DATA instead of at today's date. 0003 measured the elapsed share of the
-- cycle at today's China date, so data that end before today (a replay, the demo's simulated weeks)
-- showed every contract falling behind by the days since, while YB-PROC-VOLUME-LAG, which judges in
-- event time, raised nothing (the demo: 921 of 1,405 "lagging", 0 alerts). Columns as in 0003, and:
--   elapsed_pct  Float64  share of the contract cycle elapsed at as_of, clamped to 0..100
--   as_of        Date     the China day elapsed_pct is measured at: the day of the latest order or
--                         contract signature on record, or today if that is earlier (live data:
--                         today; data that end in the past: where they end)
DROP TABLE IF EXISTS {db}.bi_procurement_completion{on_cluster};
CREATE VIEW IF NOT EXISTS {db}.bi_procurement_completion{on_cluster} AS
SELECT
    fixmedins_code,
    med_list_codg,
    cntr_id,
    agreed_volume,
    purchased,
    if(agreed_volume > 0, toFloat64(purchased) * 100 / toFloat64(agreed_volume), NULL) AS completion_pct,
    if(c_end > c_begn,
       greatest(0., least(100., (toInt32(c_as_of) - toInt32(c_begn)) * 100 / (toInt32(c_end) - toInt32(c_begn)))),
       if(c_as_of >= c_begn, 100., 0.)) AS elapsed_pct,
    elapsed_pct - completion_pct AS lag_points,
    c_as_of AS as_of
FROM
(
    SELECT fixmedins_code, med_list_codg, cntr_id, agreed_volume, purchased, c_begn, c_end, c_as_of
    FROM
    (
        SELECT
            fixmedins_code,
            med_list_codg,
            cntr_id,
            agreed_volume,
            purchased,
            c_begn,
            c_end
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
    ) AS cp
    CROSS JOIN
    (
        SELECT least(toDate(now(), 'Asia/Shanghai'), greatest(last_order, last_sign)) AS c_as_of
        FROM
        (
            SELECT toDate(max(ord_time)) AS last_order
            FROM {db}.proc_orders{all}
        ) AS o
        CROSS JOIN
        (
            SELECT toDate(max(sign_time)) AS last_sign
            FROM {db}.proc_contracts{all}
        ) AS s
    ) AS t
);


-- bi_supplier_payments: hospitals paying suppliers for accepted deliveries, as 0003 made it, with
-- overdue judged AS OF THE DATA. 0003 counted a delivery overdue when unpaid 30 days after
-- acceptance at now(): on data that end in the past every delivery of their last 30 days was
-- "overdue" (it could not have been paid within the data). Columns as in 0003, and:
--   overdue_unpaid  UInt64   deliveries accepted more than 30 days (30 x 24 h) before as_of without
--                            any payment
--   as_of           DateTime('Asia/Shanghai')  the moment overdue is judged at: the latest
--                            acceptance or payment on record, or now() if that is earlier
-- on_time_rate keeps 0003's definition, on_time / (paid_deliveries + overdue_unpaid): the share paid
-- in full within 30 days among the deliveries whose outcome is known at as_of.
DROP TABLE IF EXISTS {db}.bi_supplier_payments{on_cluster};
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
    countIf(n_pay = 0 AND acpt_ts + 2592000 < as_of_ts) AS overdue_unpaid,
    toDateTime(any(as_of_ts), 'Asia/Shanghai') AS as_of
FROM
(
    SELECT fixmedins_code, month, acpt_ts, dlv_amt, dlv_fen, n_pay, paid_amt, paid_by_due_fen, amt_secs, as_of_ts
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
    ) AS dp
    CROSS JOIN
    (
        SELECT least(toUInt32(now()), greatest(last_acpt, last_pay)) AS as_of_ts
        FROM
        (
            SELECT toUInt32(max(acpt_time)) AS last_acpt
            FROM {db}.proc_deliveries{all}
        ) AS a
        CROSS JOIN
        (
            SELECT toUInt32(max(pay_time)) AS last_pay
            FROM {db}.supplier_payments{all}
        ) AS b
    ) AS t
)
GROUP BY fixmedins_code, month;
