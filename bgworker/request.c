/*-------------------------------------------------------------------------
 *
 * request.c
 *		Fill a flow's request template with a task's params.
 *
 * A placeholder is {{name}}, name a top-level key of the task's params.
 * Where it lands decides how its value is written:
 *   url     - percent-encoded (so a handle cannot add a path or a query);
 *   query   - name and value percent-encoded;
 *   headers - as is, but a value with CR or LF is refused;
 *   body    - a JSON string that is exactly "{{name}}" becomes the param's
 *             JSON value with its type; elsewhere the value is spliced into
 *             the string and JSON-escaped when the body is written.
 * Strings are written as themselves, numbers and booleans as JSON text,
 * objects and arrays as compact JSON.  A missing or null param is an error
 * that names it; the task then fails permanently without a request.  An
 * optional placeholder, {{name?}}, is empty when the param is missing; a
 * query parameter or header whose whole value is one is left out, and a
 * body value that is one becomes null (a first page has no cursor).
 *
 * Plain C and malloc only: see http.h.
 *
 *-------------------------------------------------------------------------
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http.h"

/* A growable malloc'd string. */
typedef struct Buf
{
	char	   *data;
	size_t		len;
	size_t		cap;
	bool		failed;
} Buf;

/* Append n bytes to b. */
static void
buf_add(Buf *b, const char *s, size_t n)
{
	if (b->failed)
		return;
	if (b->len + n + 1 > b->cap)
	{
		size_t		cap = b->cap ? b->cap : 64;
		char	   *p;

		while (b->len + n + 1 > cap)
			cap *= 2;
		p = realloc(b->data, cap);
		if (p == NULL)
		{
			b->failed = true;
			return;
		}
		b->data = p;
		b->cap = cap;
	}
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
}

/* Append a C string to b. */
static void
buf_str(Buf *b, const char *s)
{
	buf_add(b, s, strlen(s));
}

static char *msg(const char *fmt,...) __attribute__((format(printf, 1, 2)));

/* A malloc'd formatted message. */
static char *
msg(const char *fmt,...)
{
	va_list		ap;
	char	   *out = NULL;

	va_start(ap, fmt);
	if (vasprintf(&out, fmt, ap) < 0)
		out = NULL;
	va_end(ap);
	return out;
}

/* Free a template. */
void
beat_template_free(BeatTemplate *t)
{
	if (t == NULL)
		return;
	free(t->method);
	free(t->url);
	json_decref(t->query);
	json_decref(t->headers);
	json_decref(t->body);
	free(t);
}

/* Parse a request template (already checked by beat.create_flow). */
BeatTemplate *
beat_template_parse(const char *json_text, char **error)
{
	json_error_t jerr;
	json_t	   *root = json_loads(json_text, 0, &jerr);
	BeatTemplate *t;
	json_t	   *v;

	if (root == NULL || !json_is_object(root))
	{
		*error = msg("request template is not a JSON object: %s", root ? "" : jerr.text);
		json_decref(root);
		return NULL;
	}
	t = calloc(1, sizeof(BeatTemplate));
	if (t == NULL)
	{
		json_decref(root);
		*error = msg("out of memory");
		return NULL;
	}
	v = json_object_get(root, "method");
	t->method = strdup(json_is_string(v) ? json_string_value(v) : "GET");
	v = json_object_get(root, "url");
	t->url = strdup(json_is_string(v) ? json_string_value(v) : "");
	t->query = json_incref(json_object_get(root, "query"));
	t->headers = json_incref(json_object_get(root, "headers"));
	t->body = json_incref(json_object_get(root, "body"));
	json_decref(root);
	return t;
}

/*
 * The param a placeholder names (name, namelen bytes, without the braces),
 * as a borrowed reference.  NULL when it is missing or null: then *optional
 * says whether the placeholder allowed that ({{name?}}), and *error is set
 * when it did not.
 */
static json_t *
placeholder_param(json_t *params, const char *name, size_t namelen, bool *optional,
				  char **error)
{
	char		key[256];
	json_t	   *v;

	*optional = namelen > 1 && name[namelen - 1] == '?';
	if (*optional)
		namelen--;
	if (namelen == 0 || namelen >= sizeof(key))
	{
		*optional = false;
		*error = msg("bad placeholder {{%.*s}}", (int) namelen, name);
		return NULL;
	}
	memcpy(key, name, namelen);
	key[namelen] = '\0';
	v = json_object_get(params, key);
	if (v != NULL && !json_is_null(v))
		return v;
	if (!*optional)
		*error = msg("missing parameter \"%s\" for placeholder {{%s}}", key, key);
	return NULL;
}

/*
 * The value of a placeholder's param as text (malloc'd): strings are
 * themselves, other values compact JSON, a missing optional one empty.
 * NULL with *error set.
 */
static char *
param_text(json_t *params, const char *name, size_t namelen, char **error)
{
	bool		optional;
	json_t	   *v = placeholder_param(params, name, namelen, &optional, error);

	if (v == NULL)
		return optional ? strdup("") : NULL;
	if (json_is_string(v))
		return strdup(json_string_value(v));
	return json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
}

/* Percent-encode s (malloc'd). */
static char *
url_escape(const char *s)
{
	char	   *e = curl_easy_escape(NULL, s, 0);
	char	   *out = e ? strdup(e) : NULL;

	curl_free(e);
	return out;
}

/*
 * Render a template string: each {{name}} becomes the param's text, passed
 * through escape when it is not NULL.  Returns malloc'd text or NULL.
 */
static char *
render(const char *tmpl, json_t *params, char *(*escape) (const char *),
	   char **error)
{
	Buf			b = {0};
	const char *p = tmpl;

	buf_add(&b, "", 0);
	while (*p)
	{
		const char *open = strstr(p, "{{");
		const char *close;
		const char *name;
		size_t		namelen;
		char	   *value;

		if (open == NULL)
		{
			buf_str(&b, p);
			break;
		}
		close = strstr(open + 2, "}}");
		if (close == NULL)
		{
			buf_str(&b, p);
			break;
		}
		buf_add(&b, p, open - p);
		name = open + 2;
		namelen = close - name;
		while (namelen > 0 && isspace((unsigned char) *name))
			name++, namelen--;
		while (namelen > 0 && isspace((unsigned char) name[namelen - 1]))
			namelen--;
		value = param_text(params, name, namelen, error);
		if (value == NULL)
		{
			free(b.data);
			return NULL;
		}
		if (escape)
		{
			char	   *e = escape(value);

			free(value);
			value = e;
			if (value == NULL)
			{
				free(b.data);
				*error = msg("out of memory");
				return NULL;
			}
		}
		buf_str(&b, value);
		free(value);
		p = close + 2;
	}
	if (b.failed)
	{
		free(b.data);
		*error = msg("out of memory");
		return NULL;
	}
	return b.data;
}

/* A template value of query or headers as text: strings as is, else JSON. */
static char *
scalar_text(json_t *v)
{
	if (json_is_string(v))
		return strdup(json_string_value(v));
	return json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
}

/* Is the string exactly one placeholder?  Then set *name, *len. */
static bool
whole_placeholder(const char *s, const char **name, size_t *len)
{
	size_t		n = strlen(s);

	if (n < 5 || strncmp(s, "{{", 2) != 0 || strcmp(s + n - 2, "}}") != 0)
		return false;
	if (strstr(s + 2, "{{") != NULL && strstr(s + 2, "{{") < s + n - 2)
		return false;
	*name = s + 2;
	*len = n - 4;
	while (*len > 0 && isspace((unsigned char) **name))
		(*name)++, (*len)--;
	while (*len > 0 && isspace((unsigned char) (*name)[*len - 1]))
		(*len)--;
	return true;
}

/*
 * Is template value v exactly one optional placeholder, {{name?}}, whose
 * param is missing or null?  Such a query parameter or header is left out.
 */
static bool
optional_missing(json_t *v, json_t *params)
{
	const char *name;
	size_t		len;
	bool		optional;
	char	   *error = NULL;

	if (!json_is_string(v) || !whole_placeholder(json_string_value(v), &name, &len))
		return false;
	if (placeholder_param(params, name, len, &optional, &error) != NULL)
		return false;
	free(error);				/* a required one: rendering reports it */
	return optional;
}

/* A copy of a body template with its placeholders filled (new reference). */
static json_t *
fill_body(json_t *tmpl, json_t *params, char **error)
{
	if (json_is_string(tmpl))
	{
		const char *s = json_string_value(tmpl);
		const char *name;
		size_t		len;
		char	   *text;
		json_t	   *out;

		if (whole_placeholder(s, &name, &len))
		{
			bool		optional;
			json_t	   *v = placeholder_param(params, name, len, &optional, error);

			if (v == NULL)
				return optional ? json_null() : NULL;
			return json_deep_copy(v);
		}
		text = render(s, params, NULL, error);
		if (text == NULL)
			return NULL;
		out = json_string(text);
		free(text);
		if (out == NULL)
			*error = msg("a body string is not valid UTF-8 after filling");
		return out;
	}
	if (json_is_object(tmpl))
	{
		json_t	   *out = beat_json_new_object();
		const char *key;
		json_t	   *v;

		json_object_foreach(tmpl, key, v)
		{
			json_t	   *filled = fill_body(v, params, error);

			if (filled == NULL)
			{
				json_decref(out);
				return NULL;
			}
			json_object_set_new(out, key, filled);
		}
		return out;
	}
	if (json_is_array(tmpl))
	{
		json_t	   *out = json_array();
		size_t		i;
		json_t	   *v;

		json_array_foreach(tmpl, i, v)
		{
			json_t	   *filled = fill_body(v, params, error);

			if (filled == NULL)
			{
				json_decref(out);
				return NULL;
			}
			json_array_append_new(out, filled);
		}
		return out;
	}
	return json_incref(tmpl);
}

/* Is name (n bytes) in the comma-separated list redact, ignoring case? */
static bool
redacted(const char *name, size_t n, const char *redact)
{
	const char *p = redact;

	while (p && *p)
	{
		const char *end = strchr(p, ',');
		size_t		len = end ? (size_t) (end - p) : strlen(p);

		while (len > 0 && isspace((unsigned char) *p))
			p++, len--;
		while (len > 0 && isspace((unsigned char) p[len - 1]))
			len--;
		if (len == n && strncasecmp(p, name, n) == 0)
			return true;
		p = end ? end + 1 : NULL;
	}
	return false;
}

/* The URL with the values of redacted query parameters replaced by ***. */
char *
beat_redact_url(const char *url, const char *redact)
{
	const char *q = strchr(url, '?');
	Buf			b = {0};
	const char *p;

	if (q == NULL)
		return strdup(url);
	buf_add(&b, url, q - url + 1);
	p = q + 1;
	while (*p && *p != '#')
	{
		const char *amp = strpbrk(p, "&#");
		size_t		len = amp ? (size_t) (amp - p) : strlen(p);
		const char *eq = memchr(p, '=', len);

		if (eq && redacted(p, eq - p, redact))
		{
			buf_add(&b, p, eq - p + 1);
			buf_str(&b, "***");
		}
		else
			buf_add(&b, p, len);
		p += len;
		if (*p == '&')
		{
			buf_add(&b, "&", 1);
			p++;
		}
	}
	if (b.failed)
	{
		free(b.data);
		return strdup("(out of memory)");
	}
	return b.data;
}

/* Free what beat_request_build made. */
void
beat_request_free(BeatRequest *req)
{
	free(req->url);
	free(req->url_logged);
	curl_slist_free_all(req->headers);
	free(req->body);
	memset(req, 0, sizeof(*req));
}

/*
 * Fill template t with the params (JSON text) into req; false with *error.
 * secret, when not NULL, is a credential's {"headers": {...}, "query":
 * {...}}: added as they are (query values percent-encoded), and its query
 * parameters are hidden in url_logged like those named in redact.
 */
bool
beat_request_build(const BeatTemplate *t, const char *params_text,
				   const char *redact, json_t *secret, BeatRequest *req, char **error)
{
	json_error_t jerr;
	json_t	   *params = json_loads(params_text, 0, &jerr);
	char	   *url = NULL;
	Buf			full = {0};
	bool		has_content_type = false;

	memset(req, 0, sizeof(*req));
	snprintf(req->method, sizeof(req->method), "%s", t->method);
	if (params == NULL)
	{
		*error = msg("task params are not JSON: %s", jerr.text);
		return false;
	}

	url = render(t->url, params, url_escape, error);
	if (url == NULL)
		goto fail;
	buf_str(&full, url);
	free(url);

	if (t->query)
	{
		const char *key;
		json_t	   *v;
		bool		first = strchr(full.data, '?') == NULL;

		json_object_foreach(t->query, key, v)
		{
			char	   *raw;
			char	   *value;
			char	   *ekey;
			char	   *evalue;

			if (optional_missing(v, params))
				continue;
			raw = scalar_text(v);
			value = raw ? render(raw, params, NULL, error) : NULL;
			ekey = url_escape(key);
			evalue = value ? url_escape(value) : NULL;

			free(raw);
			free(value);
			if (evalue == NULL || ekey == NULL)
			{
				free(ekey);
				free(evalue);
				if (*error == NULL)
					*error = msg("out of memory");
				goto fail;
			}
			buf_str(&full, first ? "?" : "&");
			buf_str(&full, ekey);
			buf_str(&full, "=");
			buf_str(&full, evalue);
			free(ekey);
			free(evalue);
			first = false;
		}
	}

	if (t->headers)
	{
		const char *key;
		json_t	   *v;

		json_object_foreach(t->headers, key, v)
		{
			char	   *raw;
			char	   *value;
			char	   *line;

			if (optional_missing(v, params))
				continue;
			raw = scalar_text(v);
			value = raw ? render(raw, params, NULL, error) : NULL;
			free(raw);
			if (value == NULL)
				goto fail;
			if (strpbrk(value, "\r\n") != NULL)
			{
				*error = msg("header %s would contain a line break", key);
				free(value);
				goto fail;
			}
			if (strcasecmp(key, "Content-Type") == 0)
				has_content_type = true;
			line = msg("%s: %s", key, value);
			free(value);
			req->headers = curl_slist_append(req->headers, line);
			free(line);
		}
	}

	if (secret)
	{
		json_t	   *sq = json_object_get(secret, "query");
		json_t	   *sh = json_object_get(secret, "headers");
		const char *key;
		json_t	   *v;

		json_object_foreach(sq, key, v)
		{
			char	   *ekey = url_escape(key);
			char	   *evalue = url_escape(json_string_value(v) ? json_string_value(v) : "");

			buf_str(&full, strchr(full.data, '?') == NULL ? "?" : "&");
			buf_str(&full, ekey ? ekey : "");
			buf_str(&full, "=");
			buf_str(&full, evalue ? evalue : "");
			free(ekey);
			free(evalue);
		}
		json_object_foreach(sh, key, v)
		{
			char	   *line = msg("%s: %s", key, json_string_value(v) ? json_string_value(v) : "");

			req->headers = curl_slist_append(req->headers, line);
			free(line);
		}
	}

	if (t->body && !json_is_null(t->body))
	{
		if (json_is_string(t->body))
		{
			req->body = render(json_string_value(t->body), params, NULL, error);
			if (req->body == NULL)
				goto fail;
		}
		else
		{
			json_t	   *filled = fill_body(t->body, params, error);

			if (filled == NULL)
				goto fail;
			req->body = json_dumps(filled, JSON_COMPACT | JSON_ENCODE_ANY);
			json_decref(filled);
			if (!has_content_type)
				req->headers = curl_slist_append(req->headers,
												 "Content-Type: application/json");
		}
		req->body_len = req->body ? strlen(req->body) : 0;
	}

	if (full.failed)
	{
		*error = msg("out of memory");
		goto fail;
	}
	req->url = full.data;
	req->url_logged = beat_redact_url(full.data, redact);
	if (secret && json_object_size(json_object_get(secret, "query")) > 0)
	{
		/* hide the key's own query parameters whatever their names */
		Buf			names = {0};
		const char *key;
		json_t	   *v;
		char	   *twice;

		buf_add(&names, "", 0);
		json_object_foreach(json_object_get(secret, "query"), key, v)
		{
			buf_str(&names, key);
			buf_str(&names, ",");
		}
		twice = beat_redact_url(req->url_logged, names.data ? names.data : "");
		free(names.data);
		free(req->url_logged);
		req->url_logged = twice;
	}
	json_decref(params);
	return true;

fail:
	free(full.data);
	json_decref(params);
	beat_request_free(req);
	snprintf(req->method, sizeof(req->method), "%s", t->method);
	if (*error == NULL)
		*error = msg("could not build the request");
	return false;
}

/*
 * Fill n key templates with the params (JSON text), as they are (a key is
 * not escaped); out[i] are malloc'd.  False with *error on a missing param.
 * provider and credential, when not NULL, fill {{provider}} and
 * {{credential}}, over any params of those names.
 */
bool
beat_render_keys(char *const *templates, int n, const char *params_text,
				 const char *provider, const char *credential,
				 char **out, char **error)
{
	json_error_t jerr;
	json_t	   *params = json_loads(params_text, 0, &jerr);

	if (params == NULL || !json_is_object(params))
	{
		*error = msg("task params are not a JSON object: %s", params ? "" : jerr.text);
		json_decref(params);
		return false;
	}
	/* {{provider}} and {{credential}} name what serves this call */
	if (provider)
		json_object_set_new(params, "provider", json_string(provider));
	if (credential)
		json_object_set_new(params, "credential", json_string(credential));
	for (int i = 0; i < n; i++)
	{
		out[i] = render(templates[i], params, NULL, error);
		if (out[i] == NULL)
		{
			for (int k = 0; k < i; k++)
				free(out[k]);
			json_decref(params);
			return false;
		}
	}
	json_decref(params);
	return true;
}
