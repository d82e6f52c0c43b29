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
-- The day view summed per month, so both always agree (tests/sinks/test_bi_aggregates.py). A
-- regional mart copies views in name order, which puts the day view first.
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
