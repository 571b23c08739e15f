"""Billing: money rules (:mod:`core.money`), closing a period into
invoices and reading them (:mod:`billing.invoices`)."""
