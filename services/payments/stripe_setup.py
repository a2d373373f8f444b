"""`python -m services.payments.stripe_setup [--dry-run]`: Stripe setup as code (webhook endpoint,
products and prices, payment methods, customer portal). The code is services/payments/stripe/setup.py;
this module is the command's stable name."""

import sys

from services.payments.stripe.setup import main

if __name__ == "__main__":
    sys.exit(main())
