"""The app factory: settings in, a ready-to-serve Litestar application out.

Request flow, outermost first::

    RequestContextMiddleware   request id, access log
    MetricsMiddleware          requests counted and timed by route template
    AuthMiddleware             bearer token / JWT, before anything else looks at the request
    ContractMiddleware         openapi-core on the request and the response
    Litestar                   routing, DI, exception handlers -> controllers -> managers

The three middlewares wrap Litestar's ASGI handler rather than sitting in its
middleware list, because Litestar runs route middleware only after a route has
matched; ours must also see unknown routes (which need auth and get the Error shape).
"""

from __future__ import annotations

from typing import cast

from litestar import Litestar
from litestar.di import Provide
from litestar.types import ASGIApp as LitestarASGIApp

from dataplane.asgi import ASGIApp
from dataplane.auth import AuthMiddleware
from dataplane.bootstrap import ManagerFactory, real_managers
from dataplane.contract import ContractMiddleware
from dataplane.controllers.docs import DocsController
from dataplane.controllers.events import EventsController
from dataplane.controllers.guest import GuestController
from dataplane.controllers.images import ImagesController
from dataplane.controllers.ingresses import IngressesController
from dataplane.controllers.instances import InstancesController
from dataplane.controllers.meta import MetaController
from dataplane.controllers.metrics import MetricsController
from dataplane.controllers.resources import ResourcesController
from dataplane.controllers.volumes import AttachmentsController, VolumesController
from dataplane.errors import EXCEPTION_HANDLERS
from dataplane.metrics import MetricsMiddleware
from dataplane.requestctx import RequestContextMiddleware
from dataplane.runtime import Runtime
from dataplane.settings import Settings
from dataplane.spec import Spec


def create_app(settings: Settings, *, managers: ManagerFactory = real_managers) -> Litestar:
    """The application for ``settings``, running on the managers ``managers`` opens."""
    spec = Spec.load()
    runtime = Runtime(settings, spec, managers)

    def provide_runtime() -> Runtime:
        return runtime

    app = Litestar(
        route_handlers=[
            MetaController,
            ResourcesController,
            MetricsController,
            DocsController,
            ImagesController,
            InstancesController,
            GuestController,
            EventsController,
            VolumesController,
            IngressesController,
            AttachmentsController,
        ],
        dependencies={"runtime": Provide(provide_runtime, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[runtime.lifespan],
        # The hand-written openapi.yaml is the contract; Litestar's generated schema is off.
        openapi_config=None,
        logging_config=None,
    )
    contract = ContractMiddleware(
        cast(ASGIApp, app.asgi_handler), spec, enabled=settings.contract_validation
    )
    public = frozenset({"getMetrics"}) if settings.metrics_public else frozenset()
    auth = AuthMiddleware(contract, spec, settings.auth_token, settings.jwt_secret, public)
    app.asgi_handler = cast(
        LitestarASGIApp,
        RequestContextMiddleware(MetricsMiddleware(auth, spec, runtime.metrics)),
    )
    app.state.runtime = runtime
    app.state.contract = contract
    return app
