"""``[connections.NAME]`` settings for ``connector = "xero"`` (shared by the connector and its auth)."""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr, field_validator, model_validator

from syncd.plumbing.registry import ConnectionSettings

API_PATH = "/api.xro/2.0"

# Granular scopes: apps created since 2 March 2026 can only use these, and the broad
# ``accounting.transactions`` stops working in September 2027
# (https://developer.xero.com/documentation/oauth2/scopes; the granular-scopes FAQ).
# accounting.invoices covers Invoices and CreditNotes, accounting.contacts Contacts,
# accounting.settings.read Organisation/Currencies/TaxRates/Accounts; offline_access
# yields a refresh token. Older apps may set ``accounting.transactions`` instead.
DEFAULT_SCOPES = ("offline_access", "accounting.invoices", "accounting.contacts", "accounting.settings.read")


class XeroSettings(ConnectionSettings):
    """``[connections.NAME]`` for ``connector = "xero"``. Secrets arrive already resolved.

    Attributes:
        base_url: API host (``https://api.xero.com``) or the full API URL
            (``https://api.xero.com/api.xro/2.0``); kept as the host, the connector
            appends ``/api.xro/2.0``.
        token_url: the identity token endpoint.
        authorize_url: Xero's login consent URL (code flow).
        connections_url: the identity ``/connections`` endpoint (code flow tenants).
        client_id / client_secret: the app's credentials.
        grant: ``client_credentials`` (custom connection) or ``authorization_code``.
        scopes: scopes requested in the consent URL (code flow).
        tenant_id: the organisation (``xero-tenant-id``). Optional: a custom connection
            has exactly one organisation, and the code flow discovers it from
            ``connections_url`` when exactly one tenant is connected (several: an
            error lists them, and this must be set).
        refresh_token: an existing code-flow connection's refresh token, to bring it in
            without ``syncd auth xero`` (``"env:NAME"`` works). Imported once into the
            encrypted token store and rotated there; a changed value replaces the
            stored tokens, the same value never overwrites tokens rotated since.
        redirect_uri: where Xero sends the browser back to in the code flow.
        webhook_key: the webhook signing key (``None``: no webhooks).
        rate_limit_per_min: calls per minute (Xero: 60 per organisation); ``None`` = off.
        max_concurrent: calls in flight (Xero: 5 per organisation); ``None`` = off.
        unitdp: ``4`` asks Xero to keep four decimals on unit amounts (``unitdp=4``);
            ``None`` leaves Xero's default of two.
        deep_link_url: Xero's organisation login page, the base of the links to an
            invoice in Xero's web app (``XeroConnector.invoice_url``).
    """

    base_url: str = "https://api.xero.com"
    token_url: str = "https://identity.xero.com/connect/token"  # noqa: S105 - a URL, not a secret
    authorize_url: str = "https://login.xero.com/identity/connect/authorize"
    connections_url: str = "https://api.xero.com/connections"
    client_id: str
    client_secret: SecretStr
    grant: Literal["client_credentials", "authorization_code"] = "client_credentials"
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    tenant_id: str | None = None
    refresh_token: SecretStr | None = None
    redirect_uri: str = "http://localhost:8765/callback"
    webhook_key: SecretStr | None = None
    rate_limit_per_min: int | None = 60
    max_concurrent: int | None = 5
    unitdp: int | None = 4
    deep_link_url: str = "https://go.xero.com/organisationlogin/default.aspx"

    @field_validator("base_url")
    @classmethod
    def _api_host(cls, value: str) -> str:
        # The README's form is the host; the spec's server URL is the full API URL.
        return value.rstrip("/").removesuffix(API_PATH).rstrip("/")

    @model_validator(mode="after")
    def _refresh_token_needs_code_flow(self) -> XeroSettings:
        if self.refresh_token is not None and self.grant != "authorization_code":
            raise ValueError(
                "refresh_token is only used with grant = 'authorization_code' "
                "(a custom connection's client credentials need none)"
            )
        return self

    @field_validator("unitdp")
    @classmethod
    def _unitdp(cls, value: int | None) -> int | None:
        if value not in (None, 4):
            raise ValueError("unitdp must be 4 (Xero's only opt-in precision) or unset")
        return value
