-- 0006: cross-province flows per month (the issue asks for day and month; 0003 gave the day).
--
-- bi_cross_province_flows_monthly: one row per China month × insured region × treatment region.
--   month            Date            first day of the China month
--   insu_admdvs      String          insured region
--   mdtrt_admdvs     String          treatment region (a filing's treatment AREA, as in the day view)
--   settlements      Int64           settlements net of full reversals
--   medfee_sumamt    Decimal(38, 2)  net of reversals
--   fund_pay_sumamt  Decimal(38, 2)  net of reversals
--   filings          UInt64          cross-province filings dated that month (dcla_time)
-- The same two aggregates as bi_cross_province_flows, grouped by month: read directly rather than
-- through the day view, so that copying views into a regional mart needs no order between them.
-- Summing bi_cross_province_flows over a month gives the same row (tests/sinks/test_bi_aggregates.py).
CREATE VIEW IF NOT EXISTS {db}.bi_cross_province_flows_monthly{on_cluster} AS
SELECT
    month,
    insu_admdvs,
    mdtrt_admdvs,
    sum(settlements) AS settlements,
    sum(medfee_sumamt) AS medfee_sumamt,
    sum(fund_pay_sumamt) AS fund_pay_sumamt,
    sum(filings) AS filings
FROM
(
    SELECT
        toStartOfMonth(day) AS month,
        insu_admdvs,
        mdtrt_admdvs,
        settlements,
        medfee_sumamt,
        fund_pay_sumamt,
        toUInt64(0) AS filings
    FROM {db}.agg_cross_province_daily{all}
    UNION ALL
    SELECT
        toStartOfMonth(day) AS month,
        insu_admdvs,
        mdtrt_area_admdvs AS mdtrt_admdvs,
        toInt64(0) AS settlements,
        toDecimal128(0, 2) AS medfee_sumamt,
        toDecimal128(0, 2) AS fund_pay_sumamt,
        filings
    FROM {db}.agg_cross_province_filings_daily{all}
)
GROUP BY month, insu_admdvs, mdtrt_admdvs;
