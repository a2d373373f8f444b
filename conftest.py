pytest_plugins = ["deploy.testing"]
