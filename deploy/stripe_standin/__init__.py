"""A local, stateful Stripe stand-in: ``python -m deploy.stripe_standin --help``.

It keeps state for what the billing flows need (products, prices, customers, checkout sessions,
subscriptions, invoices, billing-portal sessions, test clocks), forwards every other request to
stripe-mock unchanged, hosts the checkout / invoice / portal pages and delivers signed events. See
README.md next to this file.
"""

from __future__ import annotations

API_VERSION = "2026-10-28.endive"  # the version stripe-python 16.1.0 pins; stamped on events

__all__ = ["API_VERSION"]
