"""Payments service: Stripe Checkout, Stripe webhooks, manual payments, payment history.

Owns its own database (payments, checkout sessions, Stripe customers, raw Stripe events and a copy
of the invoices it needs, kept from invoice.* events). Publishes payment.* on billing.payment and
normalized Stripe subscription/invoice events on billing.stripe.
"""
