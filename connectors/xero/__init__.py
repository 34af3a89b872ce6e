"""Xero: the Invoicing role on Xero's Accounting API, with its webhook verifier and emulator.

``connector.SPEC`` is registered under the entry-point group ``syncd.connectors`` as ``xero``.
"""
