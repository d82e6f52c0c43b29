-- 0002: make the exactly-once lookup cheap without giving up the BI sort order.
--
-- The worker asks, after a restart or rebalance, which Kafka offsets of a partition are already
-- in a table:  SELECT DISTINCT src_offset FROM T WHERE src_partition = p AND src_offset >= o
-- The tables are sorted for BI (region, institution, time), so without help that reads both
-- columns of the whole table. A projection sorted by (src_partition, src_offset) lives inside
-- every part, is written by the same INSERT (so it can never disagree with the rows), and the
-- optimizer reads it for that query automatically: on chDB 26.9 it read 8,192 rows instead of
-- 2,000,000. The price is paid on insert: 10-column batches into chDB went ~20-45% slower with
-- it on this (noisy) box, still above 300k rows/s. Projections need ClickHouse >= 22.8; on older
-- servers (18.16) these statements are skipped and the lookup scans the two columns (27 ms per
-- 2M rows on 18.16 here), which is acceptable for a query run once per partition assignment.
--
-- Not on alerts: it is a ReplacingMergeTree keyed by alert_id, so a replay collapses anyway,
-- and newer servers refuse projections on Replacing tables unless told how to merge them.
-- Parts written before this migration have no projection (still correct, just not faster);
-- run ALTER TABLE ... MATERIALIZE PROJECTION src_pos by hand if that matters.

-- min_version: 22.8
ALTER TABLE {db}.settlements{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.fee_details{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.cross_province_filings{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.proc_contracts{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.proc_orders{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.proc_deliveries{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.inventory_movements{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.supplier_payments{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.inspections{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.tips{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.penalties{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.fund_recoveries{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.fund_income{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));

-- min_version: 22.8
ALTER TABLE {db}.dead_letters{on_cluster}
    ADD PROJECTION IF NOT EXISTS src_pos (SELECT src_partition, src_offset ORDER BY (src_partition, src_offset));
