/* translate --json's many-address lines made in C: each row's line is one bytes %-format
 * (jsonlines' templates) filled with the row's numbers, read straight from numpy's arrays.
 * Python's bytes.__mod__ makes the same lines about ten times slower (the numbers become ints
 * first); jsonlines falls back to it where this module was not built. The output is byte for
 * byte bytes.__mod__'s: tests hold the two to each other.
 *
 * The templates use only %#x, %d and %016x of non-negative integers, %.0a (a number not
 * shown) and %%; anything else is refused (ValueError), never guessed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { OP_TEXT, OP_HEX, OP_DEC, OP_HEX16, OP_SKIP };

typedef struct {
    int kind;
    Py_ssize_t start, len;          /* OP_TEXT: text[start:start + len] */
} Op;

typedef struct {
    char *text;                     /* the template's text, %% made % */
    Op *ops;
    Py_ssize_t n_ops, n_args, text_len;
} Template;

typedef struct {
    Template *t;
    Py_ssize_t n;
} Templates;

static const char HEX_DIGITS[] = "0123456789abcdef";
static char HEX_PAIRS[512];        /* "000102...ff": filled when the module loads */
#define CAPSULE_NAME "qintrospect.present._rowformat.Templates"

static void templates_free(Templates *ts)
{
    for (Py_ssize_t i = 0; i < ts->n; i++) {
        PyMem_Free(ts->t[i].text);
        PyMem_Free(ts->t[i].ops);
    }
    PyMem_Free(ts->t);
    PyMem_Free(ts);
}

static void capsule_free(PyObject *capsule)
{
    templates_free(PyCapsule_GetPointer(capsule, CAPSULE_NAME));
}

/* One template parsed; -1 with an exception set. A None template (no row uses it) gets no
 * ops: a row that names it is refused when it is made. */
static int parse(PyObject *obj, Py_ssize_t number, Template *t)
{
    char *src;
    Py_ssize_t len;
    if (obj == Py_None) {
        t->n_args = -1;
        return 0;
    }
    if (PyBytes_AsStringAndSize(obj, &src, &len) < 0)
        return -1;
    t->text = PyMem_Malloc(len + 1);
    t->ops = PyMem_Malloc(sizeof(Op) * (len + 1));
    if (!t->text || !t->ops) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t out = 0, start = 0, i = 0;
    while (i < len) {
        if (src[i] != '%') {
            t->text[out++] = src[i++];
            continue;
        }
        int kind;
        Py_ssize_t width;
        const char *rest = src + i + 1;
        Py_ssize_t left = len - i - 1;
        if (left >= 1 && rest[0] == '%') {
            t->text[out++] = '%';
            i += 2;
            continue;
        } else if (left >= 2 && memcmp(rest, "#x", 2) == 0) {
            kind = OP_HEX, width = 3;
        } else if (left >= 1 && rest[0] == 'd') {
            kind = OP_DEC, width = 2;
        } else if (left >= 4 && memcmp(rest, "016x", 4) == 0) {
            kind = OP_HEX16, width = 5;
        } else if (left >= 3 && memcmp(rest, ".0a", 3) == 0) {
            kind = OP_SKIP, width = 4;
        } else {
            PyErr_Format(PyExc_ValueError, "template %zd: unsupported conversion at byte %zd",
                         number, i);
            return -1;
        }
        if (out > start)
            t->ops[t->n_ops++] = (Op){OP_TEXT, start, out - start};
        t->ops[t->n_ops++] = (Op){kind, 0, 0};
        t->n_args++;
        start = out;
        i += width;
    }
    if (out > start)
        t->ops[t->n_ops++] = (Op){OP_TEXT, start, out - start};
    t->text_len = out;
    /* room was made for the worst case (an op per byte): keep what is used (a line of 2 KB
     * has a few dozen ops, and a chunk hundreds of templates) */
    Op *used = PyMem_Realloc(t->ops, sizeof(Op) * (t->n_ops ? t->n_ops : 1));
    if (used)
        t->ops = used;
    return 0;
}

/* templates(list of bytes or None) -> an opaque object for rows() */
static PyObject *templates(PyObject *self, PyObject *arg)
{
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "templates: a list of bytes");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Templates *ts = PyMem_Calloc(1, sizeof(Templates));
    if (ts)
        ts->t = PyMem_Calloc(n ? n : 1, sizeof(Template));
    if (!ts || !ts->t) {
        PyMem_Free(ts);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    ts->n = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (parse(PySequence_Fast_GET_ITEM(seq, i), i, &ts->t[i]) < 0) {
            templates_free(ts);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    PyObject *capsule = PyCapsule_New(ts, CAPSULE_NAME, capsule_free);
    if (!capsule)
        templates_free(ts);
    return capsule;
}

/* A buffer of 8-byte integers of one of `types` (struct codes), one dimension, contiguous;
 * -1 with an exception set. */
static int get_u64(PyObject *obj, Py_buffer *view, const char *what, const char *types)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    /* (an empty format, or "<" alone, is refused before strchr: strchr finds the
     * terminator of `types` for '\0', and f[1] would read past the format's end) */
    if (view->ndim != 1 || view->itemsize != 8 || *f == '\0' || strchr(types, *f) == NULL
            || f[1]) {
        PyErr_Format(PyExc_TypeError, "%s: a 1-D array of 8-byte %sintegers", what,
                     strchr(types, 'q') ? "" : "unsigned ");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* v in hex, no leading zeros ("0" for 0): the digits' count first, then written from the
 * last one, a byte (two digits) at a time */
static char *put_hex(char *p, uint64_t v)
{
    int n = v ? (67 - __builtin_clzll(v)) / 4 : 1;
    char *end = p + n;
    for (char *q = end; q - p >= 2; v >>= 8) {
        q -= 2;
        memcpy(q, HEX_PAIRS + 2 * (v & 0xFF), 2);
    }
    if (n & 1)
        *p = HEX_DIGITS[v & 0xF];
    return end;
}

static char *put_dec(char *p, uint64_t v)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = digits[--n];
    return p;
}

/* rows(templates, which, columns, rows) -> list of bytes: for each r in rows, template
 * which[r] filled with columns[0][r], columns[1][r], ... (one column per conversion). */
static PyObject *rows(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *capsule, *which_obj, *columns_obj, *rows_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &capsule, &which_obj, &columns_obj, &rows_obj))
        return NULL;
    if (!PyCapsule_IsValid(capsule, CAPSULE_NAME)) {
        PyErr_SetString(PyExc_TypeError, "rows: the first argument comes from templates()");
        return NULL;
    }
    Templates *ts = PyCapsule_GetPointer(capsule, CAPSULE_NAME);
    PyObject *cols = PySequence_Fast(columns_obj, "columns: a sequence of arrays");
    if (!cols)
        return NULL;
    Py_ssize_t n_cols = PySequence_Fast_GET_SIZE(cols), made_views = 0;
    Py_buffer which, picks, *col = PyMem_Calloc(n_cols ? n_cols : 1, sizeof(Py_buffer));
    PyObject *out = NULL;
    char *scratch = NULL;
    int have_which = 0, have_picks = 0;
    if (!col) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_u64(which_obj, &which, "which", "qlQL") < 0)
        goto done;
    have_which = 1;
    if (get_u64(rows_obj, &picks, "rows", "qlQL") < 0)
        goto done;
    have_picks = 1;
    Py_ssize_t length = which.len / 8;
    for (; made_views < n_cols; made_views++) {
        if (get_u64(PySequence_Fast_GET_ITEM(cols, made_views), &col[made_views],
                    "columns", "QL") < 0)
            goto done;
        if (col[made_views].len / 8 != length) {
            PyErr_SetString(PyExc_ValueError, "columns: each as long as which");
            made_views++;
            goto done;
        }
    }
    Py_ssize_t longest = 0;
    for (Py_ssize_t i = 0; i < ts->n; i++)
        if (ts->t[i].text_len + 20 * ts->t[i].n_args > longest)
            longest = ts->t[i].text_len + 20 * ts->t[i].n_args;
    scratch = PyMem_Malloc(longest + 1);
    Py_ssize_t n = picks.len / 8;
    out = PyList_New(n);
    if (!scratch || !out) {
        Py_CLEAR(out);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    const int64_t *pick = picks.buf, *chosen = which.buf;
    for (Py_ssize_t k = 0; k < n; k++) {
        int64_t r = pick[k];
        if (r < 0 || r >= length) {
            PyErr_Format(PyExc_IndexError, "rows: %lld is outside the columns", (long long)r);
            Py_CLEAR(out);
            goto done;
        }
        int64_t w = chosen[r];
        if (w < 0 || w >= ts->n || ts->t[w].n_args != n_cols) {
            PyErr_Format(PyExc_ValueError, "row %lld: template %lld is missing or does not "
                         "take %zd numbers", (long long)r, (long long)w, n_cols);
            Py_CLEAR(out);
            goto done;
        }
        const Template *t = &ts->t[w];
        char *p = scratch;
        Py_ssize_t a = 0;
        for (Py_ssize_t o = 0; o < t->n_ops; o++) {
            const Op *op = &t->ops[o];
            if (op->kind == OP_TEXT) {
                memcpy(p, t->text + op->start, op->len);
                p += op->len;
                continue;
            }
            uint64_t v = ((const uint64_t *)col[a++].buf)[r];
            switch (op->kind) {
            case OP_HEX:
                *p++ = '0', *p++ = 'x';
                p = put_hex(p, v);
                break;
            case OP_DEC:
                p = put_dec(p, v);
                break;
            case OP_HEX16:
                for (int s = 56; s >= 0; s -= 8, p += 2)
                    memcpy(p, HEX_PAIRS + 2 * ((v >> s) & 0xFF), 2);
                break;
            }
        }
        PyObject *line = PyBytes_FromStringAndSize(scratch, p - scratch);
        if (!line) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, k, line);
    }

done:
    PyMem_Free(scratch);
    for (Py_ssize_t i = 0; i < made_views; i++)
        PyBuffer_Release(&col[i]);
    PyMem_Free(col);
    if (have_which)
        PyBuffer_Release(&which);
    if (have_picks)
        PyBuffer_Release(&picks);
    Py_DECREF(cols);
    return out;
}

static PyMethodDef methods[] = {
    {"templates", templates, METH_O,
     "templates(list of bytes %-formats, or None) -> the parsed templates, for rows()"},
    {"rows", rows, METH_VARARGS,
     "rows(templates, which, columns, rows) -> [template which[r] % (c[r] for c in columns) "
     "for r in rows], as bytes; which, rows and each column 1-D arrays of 8-byte integers"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "qintrospect.present._rowformat",
    "translate --json's lines made in C (see _rowformat.c)", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rowformat(void)
{
    for (int i = 0; i < 256; i++) {
        HEX_PAIRS[2 * i] = HEX_DIGITS[i >> 4];
        HEX_PAIRS[2 * i + 1] = HEX_DIGITS[i & 0xF];
    }
    return PyModule_Create(&module);
}
