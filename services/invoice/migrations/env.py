from kit.migrations import run_env
from services.invoice.models import Base

run_env(Base.metadata)
