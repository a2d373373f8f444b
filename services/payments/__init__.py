"""Payments service: Stripe Checkout, Stripe webhooks, manual payments, payment history, and the
card payments Stripe collects for a subscription's invoices.

Owns its own database (payments, checkout sessions, Stripe customers, raw Stripe events, Stripe's
charges of subscription invoices and a copy of the invoices it needs, kept from invoice.* events).
Publishes payment.* on billing.payment and normalized Stripe subscription/invoice events on
billing.stripe.
"""
