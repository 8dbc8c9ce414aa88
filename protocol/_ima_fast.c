/* keytrio.protocol._ima_fast: the IMA fast path's per-line loop in C (see protocol/ima_fast.py).
 *
 * Why C: in CPython every step of a line (split, hex decoding, name encoding, template data,
 * three hash objects, comparisons) costs an interpreter object or call, ~2.5 us a line in all,
 * while the hashing itself is ~0.3 us; here the line is read in place and hashed through one
 * reused EVP context per algorithm.
 *
 * Contract, the same as FastNg._lines in ima_fast.py (whose semantics this copies step by step,
 * and the tests compare the two on hostile input): only ever ACCEPT a line. Anything this code
 * is not sure of ends the run at that line, untouched, so the general Python path produces every
 * failure. No I/O, no global state but the fetched digest implementations.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

/* the hash algorithms the fast path can compute (protocol.tpm2.DIGEST_SIZES) */
typedef struct {
    const char *name;    /* Keylime's name */
    const char *ossl;    /* OpenSSL's */
    EVP_MD *md;          /* fetched once at import; NULL if this OpenSSL lacks it */
} Alg;

static Alg ALGS[] = {
    {"sha1", "SHA1", NULL},
    {"sha256", "SHA256", NULL},
    {"sha384", "SHA384", NULL},
    {"sha512", "SHA512", NULL},
};
#define N_ALGS (sizeof(ALGS) / sizeof(ALGS[0]))

/* the longest "<pcr> <template hash> <template> <alg>:<hex>" worth reading: a longer one
 * cannot pass (template hash <= 128 hex, the longest kernel digest 64 bytes), so it is handed
 * back without looking further */
#define PREFIX_MAX 400
#define ALG_NAME_MAX 32

static const EVP_MD *find_md(PyObject *name) {
    const char *s = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
    if (s == NULL) {
        PyErr_Clear();
        return NULL;
    }
    for (size_t i = 0; i < N_ALGS; i++) {
        if (strcmp(s, ALGS[i].name) == 0) return ALGS[i].md;
    }
    return NULL;
}

/* hex digit -> value, anything else -> 0x100: decoding ORs the entries, one test per digest
 * (branches per character were a third of the time per line) */
static uint16_t HEXVAL[256];

static void init_hexval(void) {
    for (int c = 0; c < 256; c++) {
        HEXVAL[c] = c >= '0' && c <= '9' ? c - '0'
                  : c >= 'a' && c <= 'f' ? c - 'a' + 10
                  : c >= 'A' && c <= 'F' ? c - 'A' + 10 : 0x100;
    }
}

static const char HEX[] = "0123456789abcdef";

/* the listed template hash must be exactly the lowercase hex of the computed one */
static int hex_equals(const char *listed, Py_ssize_t len, const unsigned char *d, unsigned int n) {
    if (len != 2 * (Py_ssize_t)n) return 0;
    for (unsigned int i = 0; i < n; i++) {
        if (listed[2 * i] != HEX[d[i] >> 4] || listed[2 * i + 1] != HEX[d[i] & 15]) return 0;
    }
    return 1;
}

static void put_u32le(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static int digest_into(EVP_MD_CTX *ctx, const EVP_MD *md, const void *a, size_t na, const void *b, size_t nb,
                       unsigned char *out, unsigned int *outlen) {
    return EVP_DigestInit_ex2(ctx, md, NULL) && EVP_DigestUpdate(ctx, a, na) &&
           (nb == 0 || EVP_DigestUpdate(ctx, b, nb)) && EVP_DigestFinal_ex(ctx, out, outlen);
}

/* A line's first four fields, read as ASCII (a non-ASCII character there cannot pass: "10",
 * hex, "ima-ng" and a kernel algorithm name are ASCII). For a non-ASCII line they are copied
 * into buf. Returns 1 with the offsets of the four spaces (in characters), 0 to hand back. */
static int read_prefix(PyObject *line, char *buf, const char **text, Py_ssize_t sp[4]) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(line);
    int found = 0;
    if (PyUnicode_IS_ASCII(line)) {
        const char *s = (const char *)PyUnicode_DATA(line);
        const char *p = s;
        Py_ssize_t left = n < PREFIX_MAX ? n : PREFIX_MAX;
        while (found < 4) {
            const char *q = memchr(p, ' ', (size_t)(s + left - p));
            if (q == NULL) return 0;
            sp[found++] = q - s;
            p = q + 1;
        }
        *text = s;
        return 1;
    }
    int kind = PyUnicode_KIND(line);
    const void *data = PyUnicode_DATA(line);
    for (Py_ssize_t i = 0; i < n && i < PREFIX_MAX && found < 4; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c >= 128) return 0;
        buf[i] = (char)c;
        if (c == ' ') sp[found++] = i;
    }
    *text = buf;
    return found == 4;
}

typedef struct {
    PyObject *alg;      /* the last d-ng algorithm seen (a str), or NULL */
    char name[ALG_NAME_MAX];
    Py_ssize_t name_len;
    Py_ssize_t size;    /* its digest size */
} AlgCache;

/* The digest size of the d-ng algorithm ``alg`` (ASCII, not NUL-terminated) per the kernel's
 * table ``sizes`` (str -> int); 0 when unknown (hand back), -1 with an exception set. Lists
 * nearly always use one algorithm, so the last answer is kept. */
static Py_ssize_t digest_size(AlgCache *cache, PyObject *sizes, const char *alg, Py_ssize_t len) {
    if (cache->alg != NULL && len == cache->name_len && memcmp(alg, cache->name, (size_t)len) == 0)
        return cache->size;
    if (len <= 0 || len >= ALG_NAME_MAX) return 0;
    PyObject *key = PyUnicode_DecodeASCII(alg, len, NULL);
    if (key == NULL) return -1;
    PyObject *v = PyDict_GetItemWithError(sizes, key); /* borrowed */
    if (v == NULL) {
        Py_DECREF(key);
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_ssize_t size = PyLong_Check(v) ? PyLong_AsSsize_t(v) : 0;
    if (size == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        size = 0;
    }
    /* a usable size only: the template data holds it as a u32 and the hex buffer is bounded */
    if (size <= 0 || size > 64) {
        Py_DECREF(key);
        return 0;
    }
    Py_XSETREF(cache->alg, key);
    memcpy(cache->name, alg, (size_t)len);
    cache->name_len = len;
    cache->size = size;
    return size;
}

typedef struct {
    unsigned char *p;
    size_t cap;
} Buf;

static int buf_reserve(Buf *b, size_t n) {
    if (n <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < n) {
        if (cap > SIZE_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    unsigned char *p = PyMem_Realloc(b->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

PyDoc_STRVAR(run_doc,
"run(lines, start, value, target, bank, log_hash_alg, digests, sizes) -> (value, stop, matched)\n\n"
"FastNg._lines over lines[start:]: fold in each plain, passing ima-ng PCR 10 line; stop at the\n"
"first other line (lines[stop] is then for the general path) or when value reaches target\n"
"(matched). lines: a list of str; digests: path -> accepted digests, or None; sizes: the\n"
"kernel's d-ng algorithm -> digest size. ValueError for a bank or log hash algorithm this\n"
"module cannot compute (see algorithms()).");

static PyObject *run(PyObject *self, PyObject *args) {
    PyObject *lines, *value_in, *target, *bank_name, *log_name, *digests, *sizes;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "O!nSSUUOO!:run", &PyList_Type, &lines, &start, &value_in, &target, &bank_name,
                          &log_name, &digests, &PyDict_Type, &sizes))
        return NULL;
    const EVP_MD *bank = find_md(bank_name), *log = find_md(log_name);
    if (bank == NULL || log == NULL) {
        PyErr_SetString(PyExc_ValueError, "unsupported hash algorithm");
        return NULL;
    }
    if (start < 0) start = 0;
    int same = PyUnicode_Compare(bank_name, log_name) == 0; /* both str: no error */

    PyObject *result = NULL, *getter = NULL, *none = NULL, *line = NULL;
    EVP_MD_CTX *bctx = EVP_MD_CTX_new(), *lctx = EVP_MD_CTX_new();
    Buf data = {NULL, 0};
    AlgCache cache = {NULL, {0}, 0, 0};
    unsigned char value[EVP_MAX_MD_SIZE], ext[EVP_MAX_MD_SIZE], th[EVP_MAX_MD_SIZE];
    unsigned int value_len, ext_len, th_len;
    const char *tgt = PyBytes_AS_STRING(target);
    Py_ssize_t tgt_len = PyBytes_GET_SIZE(target);
    int matched = 0;
    Py_ssize_t i = start;
    char pbuf[PREFIX_MAX];

    if (bctx == NULL || lctx == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (digests != Py_None && !PyDict_CheckExact(digests)) {
        /* any other mapping is asked exactly as FastNg asks it: .get(path, frozenset()) */
        getter = PyObject_GetAttrString(digests, "get");
        if (getter == NULL) goto done;
    }
    if (digests != Py_None) {
        none = PyFrozenSet_New(NULL);
        if (none == NULL) goto done;
    }
    /* the running value may be any length (the caller's); it is folded in by hashing */
    Py_ssize_t vlen = PyBytes_GET_SIZE(value_in);
    int from_input = 1;

    /* a lookup may run Python code that changes the list: its length is read every time */
    for (; i < PyList_GET_SIZE(lines); i++) {
        line = PyList_GET_ITEM(lines, i);
        Py_INCREF(line);
        if (!PyUnicode_Check(line)) break;
#if PY_VERSION_HEX < 0x030C0000
        /* a str made through the old wchar_t API may not have its compact form yet */
        if (PyUnicode_READY(line) < 0) goto done;
#endif
        const char *s;
        Py_ssize_t sp[4];
        if (!read_prefix(line, pbuf, &s, sp)) break;
        /* 10 <template hash> ima-ng <alg>:<hex> <name> */
        if (sp[0] != 2 || s[0] != '1' || s[1] != '0') break;
        if (sp[2] - sp[1] - 1 != 6 || memcmp(s + sp[1] + 1, "ima-ng", 6) != 0) break;
        const char *dng = s + sp[2] + 1;
        Py_ssize_t dng_len = sp[3] - sp[2] - 1;
        const char *colon = memchr(dng, ':', (size_t)dng_len);
        if (colon == NULL) break;
        Py_ssize_t alg_len = colon - dng;
        Py_ssize_t size = digest_size(&cache, sizes, dng, alg_len);
        if (size < 0) goto done;
        if (size == 0 || dng_len - alg_len - 1 != 2 * size) break;
        unsigned char digest[64];
        const unsigned char *hx = (const unsigned char *)colon + 1;
        unsigned int bad_hex = 0;
        for (Py_ssize_t k = 0; k < size; k++) {
            unsigned int hi = HEXVAL[hx[2 * k]], lo = HEXVAL[hx[2 * k + 1]];
            bad_hex |= hi | lo;
            digest[k] = (unsigned char)(hi << 4 | lo);
        }
        if (bad_hex & 0x100) break;

        /* the name: the rest of the line, UTF-8 with surrogateescape as the kernel wrote it */
        PyObject *path = NULL, *encoded = NULL;
        const char *name;
        Py_ssize_t name_len;
        Py_ssize_t name_start = sp[3] + 1;
        if (PyUnicode_IS_ASCII(line)) {
            name = (const char *)PyUnicode_DATA(line) + name_start;
            name_len = PyUnicode_GET_LENGTH(line) - name_start;
        } else {
            path = PyUnicode_Substring(line, name_start, PyUnicode_GET_LENGTH(line));
            if (path == NULL) goto done;
            encoded = PyUnicode_AsEncodedString(path, "utf-8", "surrogateescape");
            if (encoded == NULL) {
                Py_DECREF(path);
                if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) goto done;
                PyErr_Clear();
                break;
            }
            name = PyBytes_AS_STRING(encoded);
            name_len = PyBytes_GET_SIZE(encoded);
        }
        if ((size_t)name_len > UINT32_MAX - 1 - 64 - ALG_NAME_MAX) {
            Py_XDECREF(path);
            Py_XDECREF(encoded);
            break;
        }
        /* template data: u32le(len) "<alg>:\0" digest u32le(len) name "\0" */
        size_t dlen = 4 + (size_t)alg_len + 2 + (size_t)size + 4 + (size_t)name_len + 1;
        if (buf_reserve(&data, dlen) < 0) {
            Py_XDECREF(path);
            Py_XDECREF(encoded);
            goto done;
        }
        unsigned char *d = data.p;
        put_u32le(d, (uint32_t)(alg_len + 2 + size));
        memcpy(d + 4, dng, (size_t)alg_len);
        d[4 + alg_len] = ':';
        d[5 + alg_len] = '\0';
        memcpy(d + 6 + alg_len, digest, (size_t)size);
        unsigned char *nm = d + 6 + alg_len + size;
        put_u32le(nm, (uint32_t)(name_len + 1));
        memcpy(nm + 4, name, (size_t)name_len);
        nm[4 + name_len] = '\0';
        Py_XDECREF(encoded); /* name is not read past here */

        if (!digest_into(bctx, bank, d, dlen, NULL, 0, ext, &ext_len) ||
            (!same && !digest_into(lctx, log, d, dlen, NULL, 0, th, &th_len))) {
            Py_XDECREF(path);
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
            goto done;
        }
        const unsigned char *thv = same ? ext : th;
        unsigned int thn = same ? ext_len : th_len;
        if (!hex_equals(s + sp[0] + 1, sp[1] - sp[0] - 1, thv, thn)) {
            Py_XDECREF(path);
            break;
        }

        if (digests != Py_None) {
            if (path == NULL) {
                path = PyUnicode_Substring(line, name_start, PyUnicode_GET_LENGTH(line));
                if (path == NULL) goto done;
            }
            PyObject *listed; /* strong */
            if (getter == NULL) {
                listed = PyDict_GetItemWithError(digests, path);
                if (listed == NULL && PyErr_Occurred()) {
                    Py_DECREF(path);
                    goto done;
                }
                listed = listed ? listed : none;
                Py_INCREF(listed);
            } else {
                listed = PyObject_CallFunctionObjArgs(getter, path, none, NULL);
                if (listed == NULL) {
                    Py_DECREF(path);
                    goto done;
                }
            }
            Py_DECREF(path);
            path = NULL;
            PyObject *dg = PyBytes_FromStringAndSize((const char *)digest, size);
            if (dg == NULL) {
                Py_DECREF(listed);
                goto done;
            }
            int ok = PySequence_Contains(listed, dg);
            Py_DECREF(dg);
            Py_DECREF(listed);
            if (ok < 0) goto done;
            if (!ok) break;
        }
        Py_XDECREF(path);

        const unsigned char *prev = from_input ? (const unsigned char *)PyBytes_AS_STRING(value_in) : value;
        size_t prev_len = from_input ? (size_t)vlen : value_len;
        if (!digest_into(bctx, bank, prev, prev_len, ext, ext_len, value, &value_len)) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL digest failed");
            goto done;
        }
        from_input = 0;
        Py_CLEAR(line);
        if ((Py_ssize_t)value_len == tgt_len && memcmp(value, tgt, value_len) == 0) {
            matched = 1;
            i++;
            break;
        }
    }
    {
        PyObject *v = from_input ? Py_NewRef(value_in) : PyBytes_FromStringAndSize((const char *)value, value_len);
        if (v != NULL) result = Py_BuildValue("(NnO)", v, i, matched ? Py_True : Py_False);
    }
done:
    Py_XDECREF(line);
    Py_XDECREF(getter);
    Py_XDECREF(none);
    Py_XDECREF(cache.alg);
    PyMem_Free(data.p);
    EVP_MD_CTX_free(bctx);
    EVP_MD_CTX_free(lctx);
    return result;
}

static PyObject *algorithms(PyObject *self, PyObject *unused) {
    PyObject *out = PyFrozenSet_New(NULL);
    if (out == NULL) return NULL;
    for (size_t i = 0; i < N_ALGS; i++) {
        if (ALGS[i].md == NULL) continue;
        PyObject *s = PyUnicode_FromString(ALGS[i].name);
        if (s == NULL || PySet_Add(out, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(s);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, run_doc},
    {"algorithms", algorithms, METH_NOARGS,
     "algorithms() -> frozenset[str]: the bank / log hash algorithms run() can compute."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ima_fast",
    "The IMA fast path's per-line loop in C (keytrio.protocol.ima_fast uses it when importable).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ima_fast(void) {
    init_hexval();
    for (size_t i = 0; i < N_ALGS; i++) {
        if (ALGS[i].md == NULL) ALGS[i].md = EVP_MD_fetch(NULL, ALGS[i].ossl, NULL);
    }
    ERR_clear_error(); /* a digest this OpenSSL lacks left its error on the queue */
    return PyModule_Create(&module);
}
