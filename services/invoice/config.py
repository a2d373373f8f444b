from pydantic_settings import SettingsConfigDict

from kit.settings import ServiceSettings


class InvoiceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="INVOICE_", extra="ignore")

    service_name: str = "invoice"
    port: int = 8001
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:55432/invoice"
    default_net_days: int = 30
    # How often this replica looks for invoices past their due date.
    overdue_scan_interval: float = 60.0
    # Base URL of the client portal, used for pay links in PDFs.
    portal_url: str = "http://127.0.0.1:8000/portal"
    # PDFs rendered at once per replica (each render is CPU-bound work in a worker thread).
    pdf_render_concurrency: int = 4
