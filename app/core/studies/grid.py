"""A study's grid: axes (dotted spec paths) and their values, expanded into job specs.

The grid is the cartesian product of the axes in the order given; each point sets its values
into a copy of the base spec, and each resulting spec is validated exactly as a submitted job
is, so one invalid point names itself and its field.
"""

import copy
import itertools
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from app.core.errors import InvalidInput
from app.core.spec import JobSpec, SpecError

SEED_AXIS = "seed"

# A spec field and what is wrong with it.
Failure = tuple[str, str]


@dataclass(frozen=True)
class GridPoint:
    index: int
    values: dict[str, Any]  # axis -> value
    spec: JobSpec


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, also through `X | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            found = _model_in(member)
            if found is not None:
                return found
    return None


def path_exists(path: str) -> bool:
    """Whether a dotted path names a field of the job spec (a leaf or a whole section)."""
    model: type[BaseModel] | None = JobSpec
    for part in path.split("."):
        if model is None or part not in model.model_fields:
            return False
        model = _model_in(model.model_fields[part].annotation)
    return True


def check_axes(grid: dict[str, list[Any]], max_jobs: int) -> int:
    """The number of points, once every axis names a spec field and the size is allowed."""
    for axis, values in grid.items():
        if not path_exists(axis):
            raise InvalidInput(f"grid.{axis}", f"{axis!r} is not a field of the job spec")
        if not values:
            raise InvalidInput(f"grid.{axis}", "an axis needs at least one value")
        # 1 and 1.0 are one value of a float field: two jobs that differ in nothing.
        keys = [_key(_as_floats(value)) for value in values]
        if len(set(keys)) != len(keys):
            raise InvalidInput(f"grid.{axis}", "an axis lists a value twice")
        # "optimizer" and "optimizer.lr": the section would overwrite the field, or the field
        # a part of the section, and the job's grid point would name an lr it never ran.
        for other in grid:
            if other != axis and axis.startswith(other + "."):
                raise InvalidInput(f"grid.{axis}", f"overlaps the axis {other!r}; give one")
    size = math.prod(len(values) for values in grid.values())
    if size > max_jobs:
        raise InvalidInput(
            "grid", f"{size} grid points; at most {max_jobs} jobs (TRAINSVC_MAX_STUDY_JOBS)"
        )
    return size


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _as_floats(value: Any) -> Any:
    """The value with every integer (not bool) a float, for comparing values."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, list):
        return [_as_floats(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_floats(item) for key, item in value.items()}
    return value


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in a nested dict, creating the sections that are missing. A section
    that is there but not an object is the base's mistake: replaced, it was silently lost."""
    *sections, leaf = path.split(".")
    node = spec
    for depth, section in enumerate(sections, start=1):
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            where = ".".join(sections[:depth])
            raise InvalidInput(f"base.{where}", f"must be an object to set the axis {path!r}")
        node = child
    node[leaf] = copy.deepcopy(value)


def _first_error(exc: ValidationError) -> Failure:
    error = exc.errors()[0]
    location = [str(part) for part in error.get("loc", ())]
    message = str(error.get("msg", "invalid"))
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, SpecError):
        location += cause.field.split(".")
        message = cause.message
    return ".".join(location) or "spec", message.removeprefix("Value error, ")


def _validated(base: dict[str, Any], values: dict[str, Any]) -> JobSpec:
    raw = copy.deepcopy(base)
    for axis, value in values.items():
        set_path(raw, axis, value)
    # Through JSON, as a submitted job is parsed: the same strictness, the same errors.
    return JobSpec.model_validate_json(json.dumps(raw))


def _validation_failure(base: dict[str, Any], values: dict[str, Any]) -> Failure | None:
    try:
        _validated(base, values)
    except ValidationError as exc:
        return _first_error(exc)
    return None


def expand(base: dict[str, Any], grid: dict[str, list[Any]]) -> list[GridPoint]:
    """Every point of the grid as a validated spec; the first invalid point is a 422 naming it."""
    axes = list(grid)
    combinations = [
        dict(zip(axes, combination, strict=True))
        for combination in itertools.product(*(grid[axis] for axis in axes))
    ]
    points = []
    for index, values in enumerate(combinations):
        try:
            spec = _validated(base, values)
        except ValidationError as exc:
            raise point_invalid(
                index,
                values,
                _first_error(exc),
                len(combinations),
                lambda i: _validation_failure(base, combinations[i]),
            ) from exc
        points.append(GridPoint(index, values, spec))
    _check_distinct(points)
    return points


def _check_distinct(points: list[GridPoint]) -> None:
    """Two grid points that validate to the same spec would be the same job twice (an axis
    value the base or the spec's defaults already imply, in another spelling)."""
    seen: dict[str, GridPoint] = {}
    for point in points:
        key = point.spec.model_dump_json()
        if (first := seen.setdefault(key, point)) is not point:
            raise PointInvalid(
                point.index, point.values, ("spec", f"the same job as grid point {first.index}")
            )


# A grid point is echoed in its error so that a person finds it; a value of a hundred
# kilobytes (a wrong paste) is echoed only as far as that needs.
_ECHO_CHARS = 200


class PointInvalid(InvalidInput):
    """A grid point whose spec is unacceptable: a 422 on `grid[i].<field>`, echoing the point.

    `shared` when every point fails alike in a field no axis sets: then the fault is the
    base's, and the caller names it in the request's own terms (`base.<field>`, or a preset's
    option), not as the first point's.
    """

    def __init__(
        self, index: int, values: dict[str, Any], failure: Failure, *, shared: bool = False
    ) -> None:
        field, reason = failure
        point = _key(values)
        if len(point) > _ECHO_CHARS:
            point = point[:_ECHO_CHARS] + "..."
        super().__init__(f"grid[{index}].{field}", f"{reason} (grid point {point})")
        self.spec_field = field
        self.reason = reason
        self.shared = shared


def point_invalid(
    index: int,
    values: dict[str, Any],
    failure: Failure,
    count: int,
    failure_at: Callable[[int], Failure | None],
) -> PointInvalid:
    """The error for point `index` (of `count`) failing with `failure`. Only a failure of
    the first point can be shared; the other points are judged (`failure_at`) only then."""
    field = failure[0]
    on_grid = any(
        axis == field or axis.startswith(f"{field}.") or field.startswith(f"{axis}.")
        for axis in values
    )
    shared = index == 0 and not on_grid and all(failure_at(i) == failure for i in range(1, count))
    return PointInvalid(index, values, failure, shared=shared)


def configuration_of(point: dict[str, Any]) -> dict[str, Any]:
    """A grid point without its seed: what the seeds of one configuration share."""
    return {axis: value for axis, value in point.items() if axis != SEED_AXIS}


def point_key(point: dict[str, Any]) -> str:
    """A hashable, order-independent key for a grid point (values may be lists)."""
    return json.dumps(point, sort_keys=True)
