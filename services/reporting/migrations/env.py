from kit.migrations import run_env
from services.reporting.models import Base

run_env(Base.metadata)
