/* The per-packet AEAD call into libsodium, without ctypes.
 *
 * Every tunnel packet is sealed once and opened once. Through ctypes each call converts nine
 * arguments and takes about 2 us, three times libsodium's own work on a small packet; in a
 * request/reply loop that was 9 % of the round trip. This module does the call and builds the
 * nonce; crypto.py keeps the errors and falls back to ctypes where this module was not compiled.
 *
 * It links against nothing. crypto.py calls bind() with the addresses of the two libsodium
 * functions in the library pysodium loaded, so there is one libsodium in the process and no
 * build-time dependency on its headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define KEY_SIZE 32
#define NONCE_SIZE 12
#define TAG_SIZE 16

typedef int (*encrypt_fn)(unsigned char *c, unsigned long long *clen_p, const unsigned char *m,
                          unsigned long long mlen, const unsigned char *ad,
                          unsigned long long adlen, const unsigned char *nsec,
                          const unsigned char *npub, const unsigned char *k);
typedef int (*decrypt_fn)(unsigned char *m, unsigned long long *mlen_p, unsigned char *nsec,
                          const unsigned char *c, unsigned long long clen,
                          const unsigned char *ad, unsigned long long adlen,
                          const unsigned char *npub, const unsigned char *k);

static encrypt_fn aead_encrypt = NULL;
static decrypt_fn aead_decrypt = NULL;

#define DATA(obj) ((unsigned char *)PyBytes_AS_STRING(obj))

/* Noise's ChaChaPoly nonce: 32 zero bits, then the counter as a little-endian 64-bit integer. */
static int make_nonce(PyObject *counter, unsigned char nonce[NONCE_SIZE]) {
    if (!PyLong_Check(counter)) {
        PyErr_SetString(PyExc_TypeError, "the counter must be an int");
        return -1;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(counter); /* OverflowError if < 0 */
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    memset(nonce, 0, 4);
    for (int i = 0; i < 8; i++)
        nonce[4 + i] = (unsigned char)(value >> (8 * i));
    return 0;
}

/* The text may be bytes or bytearray (a packet is assembled in a bytearray); key and ad bytes. */
static int check_args(PyObject *const *args, Py_ssize_t nargs, const char *name) {
    if (aead_encrypt == NULL || aead_decrypt == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_aead: bind() was not called");
        return -1;
    }
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "%s() takes 4 arguments (%zd given)", name, nargs);
        return -1;
    }
    if (!PyBytes_CheckExact(args[0]) || !PyBytes_CheckExact(args[3]) ||
        !(PyBytes_CheckExact(args[2]) || PyByteArray_CheckExact(args[2]))) {
        PyErr_Format(PyExc_TypeError, "%s(): key and ad must be bytes, the text bytes or bytearray",
                     name);
        return -1;
    }
    /* libsodium reads a fixed length from the key pointer. */
    if (PyBytes_GET_SIZE(args[0]) != KEY_SIZE) {
        PyErr_Format(PyExc_ValueError, "%s(): the key must be %d bytes", name, KEY_SIZE);
        return -1;
    }
    return 0;
}

static unsigned char *text_data(PyObject *text) {
    return PyBytes_CheckExact(text) ? DATA(text) : (unsigned char *)PyByteArray_AS_STRING(text);
}

static Py_ssize_t text_size(PyObject *text) {
    return PyBytes_CheckExact(text) ? PyBytes_GET_SIZE(text) : PyByteArray_GET_SIZE(text);
}

/* seal(key, counter, plaintext, ad) -> ciphertext followed by the tag */
static PyObject *seal(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    unsigned char nonce[NONCE_SIZE];
    if (check_args(args, nargs, "seal") < 0 || make_nonce(args[1], nonce) < 0)
        return NULL;
    Py_ssize_t size = text_size(args[2]);
    if (size > PY_SSIZE_T_MAX - TAG_SIZE) {
        PyErr_SetString(PyExc_OverflowError, "seal(): plaintext too long");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size + TAG_SIZE);
    if (out == NULL)
        return NULL;
    /* No Python code ran since text_size(): bytes objects are not tracked by the garbage
     * collector, so allocating `out` cannot run a finalizer that resizes a bytearray text. */
    aead_encrypt(DATA(out), NULL, text_data(args[2]), (unsigned long long)size, DATA(args[3]),
                 (unsigned long long)PyBytes_GET_SIZE(args[3]), NULL, nonce, DATA(args[0]));
    return out;
}

/* open(key, counter, ciphertext, ad) -> plaintext, or None if it does not authenticate */
static PyObject *open_(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    unsigned char nonce[NONCE_SIZE];
    if (check_args(args, nargs, "open") < 0 || make_nonce(args[1], nonce) < 0)
        return NULL;
    Py_ssize_t size = text_size(args[2]);
    if (size < TAG_SIZE)
        Py_RETURN_NONE;
    /* For an empty plaintext this is the shared b"" object: libsodium writes nothing to it. As
     * in seal(), allocating it runs no Python code. */
    PyObject *out = PyBytes_FromStringAndSize(NULL, size - TAG_SIZE);
    if (out == NULL)
        return NULL;
    if (aead_decrypt(DATA(out), NULL, NULL, text_data(args[2]), (unsigned long long)size,
                     DATA(args[3]), (unsigned long long)PyBytes_GET_SIZE(args[3]), nonce,
                     DATA(args[0])) != 0) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

/* bind(encrypt_address, decrypt_address): crypto_aead_chacha20poly1305_ietf_{en,de}crypt */
static PyObject *bind(PyObject *module, PyObject *args) {
    unsigned long long encrypt_address, decrypt_address;
    if (!PyArg_ParseTuple(args, "KK:bind", &encrypt_address, &decrypt_address))
        return NULL;
    if (encrypt_address == 0 || decrypt_address == 0) {
        PyErr_SetString(PyExc_ValueError, "bind(): a function address is NULL");
        return NULL;
    }
    aead_encrypt = (encrypt_fn)(uintptr_t)encrypt_address;
    aead_decrypt = (decrypt_fn)(uintptr_t)decrypt_address;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL,
     "seal(key, counter, plaintext, ad) -> ciphertext and tag"},
    {"open", (PyCFunction)(void (*)(void))open_, METH_FASTCALL,
     "open(key, counter, ciphertext, ad) -> plaintext, or None if it does not authenticate"},
    {"bind", bind, METH_VARARGS, "bind(encrypt_address, decrypt_address)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_aead",
    "ChaCha20-Poly1305 (IETF) through libsodium, called without ctypes.", -1, methods,
};

PyMODINIT_FUNC PyInit__aead(void) { return PyModule_Create(&module_def); }
