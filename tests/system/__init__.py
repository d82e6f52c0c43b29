"""End-to-end tests: real `yibao worker` processes against the real broker and ClickHouse engines
(delivery, outages, hostile input, transport, scale-out)."""
