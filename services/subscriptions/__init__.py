"""subscriptions service: plans, prices, the mirror of Stripe's subscriptions (see DESIGN.md, issue 9)."""
