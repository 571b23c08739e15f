"""Billing: money rules (:mod:`billing.money`), closing a period into
invoices and reading them (:mod:`billing.invoices`)."""
