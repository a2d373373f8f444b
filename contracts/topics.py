"""Kafka topics, one per aggregate; messages are keyed by the aggregate id to keep its order."""

INVOICE = "billing.invoice"
PAYMENT = "billing.payment"
SUBSCRIPTION = "billing.subscription"
NOTIFICATION = "billing.notification"
STRIPE = "billing.stripe"
DEADLETTER = "billing.deadletter"  # events consumers gave up on (see contracts/deadletter.py)

ALL = (INVOICE, PAYMENT, SUBSCRIPTION, NOTIFICATION, STRIPE, DEADLETTER)
