"""The explorer's routes as APIRouters (issue #17): the operations are exactly the ones the API had before the
split, every handler gets the Explorer through the dependency, and a new router is one entry in api.ROUTERS."""
import ast
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

import cytosae.explorer.api as api
from cytosae.explorer import create_app
from cytosae.explorer.state import ExplorerDep, get_explorer
from explorer_fixtures import LOCAL, copy_of, session_run

EXPLORER = Path(api.__file__).parent

# (method, path, operationId) of every operation, as create_app served them before the routers (register functions)
OPERATIONS = {
    ("GET", "/api/run", "run_info_api_run_get"),
    ("GET", "/api/latents", "latents_api_latents_get"),
    ("GET", "/api/search", "search_api_search_get"),
    ("GET", "/api/latents/{latent}", "latent_page_api_latents__latent__get"),
    ("GET", "/api/latents/{latent}/heatmaps", "latent_heatmaps_api_latents__latent__heatmaps_get"),
    ("GET", "/api/images", "images_api_images_get"),
    ("GET", "/api/image", "image_api_image_get"),
    ("GET", "/api/image/patch", "image_patch_api_image_patch_get"),
    ("GET", "/api/image/heatmap", "image_heatmap_api_image_heatmap_get"),
    ("GET", "/api/image/file", "image_file_api_image_file_get"),
    ("POST", "/api/uploads", "upload_api_uploads_post"),
    ("GET", "/api/uploads/{upload_id}/patch", "upload_patch_api_uploads__upload_id__patch_get"),
    ("GET", "/api/uploads/{upload_id}/heatmap", "upload_heatmap_api_uploads__upload_id__heatmap_get"),
    ("GET", "/api/uploads/{upload_id}/file", "upload_file_api_uploads__upload_id__file_get"),
    ("GET", "/api/patients/barcodes", "barcodes_api_patients_barcodes_get"),
    ("GET", "/api/patients/compare", "compare_api_patients_compare_get"),
    ("GET", "/api/patients/{patient_id}/cells", "patient_cells_api_patients__patient_id__cells_get"),
    ("GET", "/api/classify", "classify_api_classify_get"),
    ("GET", "/api/annotations", "list_annotations_api_annotations_get"),
    ("GET", "/api/annotations/{latent}", "get_annotation_api_annotations__latent__get"),
    ("PUT", "/api/annotations/{latent}", "put_annotation_api_annotations__latent__put"),
    ("DELETE", "/api/annotations/{latent}", "delete_annotation_api_annotations__latent__delete"),
    # added since, by expert validation (issue #19)
    ("POST", "/api/validation/session", "start_session_api_validation_session_post"),
    ("GET", "/api/validation/session", "get_session_api_validation_session_get"),
    ("GET", "/api/validation/item", "get_item_api_validation_item_get"),
    ("PUT", "/api/validation/answer", "put_answer_api_validation_answer_put"),
    ("GET", "/api/validation/description/{latent}", "get_description_api_validation_description__latent__get"),
    # the quality page (issue #18 item 5)
    ("GET", "/api/quality", "quality_api_quality_get"),
}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return copy_of(session_run(tmp_path_factory), tmp_path_factory.mktemp("routers"))


@pytest.fixture(scope="module")
def app(fx):
    return create_app(fx.path)


def _api_routes(app) -> list[APIRoute]:
    return [c.original_route for c in iter_route_contexts(app.routes) if isinstance(c.original_route, APIRoute)]


def test_the_operations_are_the_ones_the_api_had(app):
    spec = app.openapi()
    ops = {(m.upper(), path, op["operationId"]) for path, methods in spec["paths"].items() for m, op in methods.items()}
    assert ops == OPERATIONS
    # the page itself is a route too, outside the schema; with static=False (the report) it is absent
    assert {r.path for r in _api_routes(app) if not r.include_in_schema} == {"/", "/validate"}


def test_route_modules_hold_routers_not_register_functions():
    included = {id(r) for r in api.ROUTERS}
    for path in sorted(EXPLORER.glob("routes_*.py")):
        tree = ast.parse(path.read_text())
        top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert "register" not in top, path.name
        nested = [n.name for f in tree.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if n is not f and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        assert nested == [] or path.name == "routes_patients.py" and nested == ["order"], (path.name, nested)
        module = __import__(f"cytosae.explorer.{path.stem}", fromlist=["_"])
        routers = [v for v in vars(module).values() if isinstance(v, APIRouter)]
        assert routers and all(id(r) in included for r in routers), f"{path.name}: a router not in api.ROUTERS"


def test_every_handler_gets_the_explorer_from_the_dependency(app):
    routes = [r for r in _api_routes(app) if r.include_in_schema]
    assert len(routes) == len(OPERATIONS)
    for r in routes:
        assert get_explorer in _calls(r.dependant), r.path


def _calls(dependant) -> list:
    """Every dependency a route resolves, nested ones included (the validation store needs the Explorer too)."""
    return [c for d in dependant.dependencies for c in [d.call, *_calls(d)]]


def test_explorer_functions_stay_short():
    long = []
    for path in sorted(EXPLORER.glob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = n.end_lineno - n.lineno + 1
                is_handler = path.name.startswith("routes_") and any(
                    isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and
                    d.func.attr in ("get", "put", "post", "delete") for d in n.decorator_list)
                if length > (25 if is_handler else 60):
                    long.append(f"{path.name}:{n.lineno} {n.name} ({length} lines)")
    assert long == []


def test_a_new_router_is_one_entry_in_ROUTERS(fx, monkeypatch):
    extra = APIRouter()

    @extra.post("/api/validation/ping", summary="test-only route")
    def ping(ex: ExplorerDep):
        return {"n_latents": ex.run.n_latents}

    monkeypatch.setattr(api, "ROUTERS", api.ROUTERS + (extra,))
    with TestClient(create_app(fx.path), base_url=LOCAL) as c:
        assert c.post("/api/validation/ping").json() == {"n_latents": fx.n_latents}
        r = c.options("/api/validation/ping")  # the method guard sees the routes of included routers
        assert r.status_code == 204 and r.headers["allow"] == "OPTIONS, POST"
        r = c.put("/api/validation/ping")
        assert r.status_code == 405 and r.headers["allow"] == "OPTIONS, POST"
        assert "/api/validation/ping" in c.get("/openapi.json").json()["paths"]
