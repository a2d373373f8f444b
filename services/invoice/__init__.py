"""Invoice service: clients, invoices, line items, numbering, status machine, invoice events."""
