"""Curation: one small filter class per failure (a `name`, typed thresholds, a stable reason),
a streaming pipeline that keeps every rejected record with `reject_reason = "name: detail"`, exact
and near-duplicate removal, and a report of counts, examples and histograms."""
