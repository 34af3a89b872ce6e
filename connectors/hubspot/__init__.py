"""HubSpot CRM connector: deals, companies, contacts and line items; v3 webhooks; an emulator."""
