"""Everything of the payments service that speaks Stripe, read in this order:

* `intake.py`: `POST /webhooks/stripe`: verify the signature on the raw body, store by event id, 200.
* `worker.py`: the webhook worker (kit's PollingWorker) takes stored events, retries each with backoff.
* `handlers.py`: `HANDLERS`, one short function per event type, the only list of handled types.
* `events.py`: the typed models those handlers receive (the Stripe fields we use, parsed once).
* `payments.py`: the domain of those events (payments, refunds, checkout sessions, and
  `StripeInvoicePayments`: a subscription's Stripe invoice collected by Stripe as a payment of ours),
  on services/payments/ledger.py (invoice copies, what is still due, the payment.* event).

Beside them: `normalize.py` (what payments publishes on billing.stripe for other services),
`gateway.py` (the calls we make to Stripe), `setup.py` (webhook endpoint, products, prices, portal as
code; `python -m services.payments.stripe_setup`) and `testing.py` (Stripe events built and signed
exactly as Stripe does, for the tests and the bench).

Importing this package imports none of them: `service.py` uses `gateway.py` and `payments.py` without
pulling in the intake and the worker.
"""
