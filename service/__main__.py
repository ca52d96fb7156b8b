"""`python -m service`: serve `service.app:app` with uvicorn on ATTN_HOST:ATTN_PORT."""

import uvicorn

from .settings import Settings


def main() -> None:
    settings = Settings()
    uvicorn.run("service.app:app", host=settings.host, port=settings.port, log_level=settings.log_level)


if __name__ == "__main__":
    main()
