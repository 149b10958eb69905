"""flask-smorest wiring: the Api and Blueprint classes every blueprint of the service uses."""

from __future__ import annotations

import json

import flask_smorest
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import HTTPException

from web import errors
from web.schemas import ErrorSchema


class LenientJsonParser(FlaskParser):
    """Parse a non-empty body as JSON whatever its Content-Type, as the previous API did."""

    def _raw_load_json(self, req):
        data = req.get_data(cache=True)
        if not data:
            return super()._raw_load_json(req)
        return json.loads(data)


class Api(flask_smorest.Api):
    """flask-smorest's Api answering every HTTP error in the service's one error shape."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException):
        return errors.http_error_response(error)


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = LenientJsonParser()
