"""reporting service: read models of invoices, payments and subscriptions fed only by Kafka events, and
the admin reports over them (summary, outstanding, aging, monthly revenue, payment methods, MRR, DSO,
reconciliation) as JSON, CSV and xlsx."""
