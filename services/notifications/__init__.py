"""Notifications service: emails for invoice and payment events, payment reminders, open tracking."""
